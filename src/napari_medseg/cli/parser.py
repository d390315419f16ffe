"""The ``medseg`` command line: each verb's options and the function it calls."""

from __future__ import annotations

import argparse

from .apps import cmd_demo, cmd_web
from .checkpoints import cmd_average, cmd_info
from .convert import cmd_convert
from .evaluate import cmd_evaluate
from .predict import cmd_predict
from .train import cmd_train
from .tune import cmd_tune_classes, cmd_tune_nuclei, cmd_tune_threshold
from . import values

# what `medseg --help` says first
DESCRIPTION = ("medseg: predict, evaluate, convert, train, average, tune-threshold, tune-nuclei, tune-classes, info, "
               "the napari demo and the browser front, from the shell.")


def _instance_options(parser, model: bool = False) -> None:
    """The watershed's settings; ``model``: a model runs, and its own settings are the default."""
    from ..nuclei.watershed import InstanceSettings

    group = parser.add_argument_group(
        "instances from class maps (watershed)",
        None if model else "used only for a side without instance maps (evaluate reads them where they exist)")
    defaults = InstanceSettings()

    def default(name: str) -> str:
        value = getattr(defaults, name)
        return f"default: the model's own (medseg tune-nuclei), else {value}" if model else f"default {value}"

    group.add_argument("--min-distance", type=values.count,
                       help=("models without a distance head: " if model else "")
                       + f"minimum distance between nucleus centres (px; {default('min_distance')})")
    group.add_argument("--min-size", type=values.count,
                       help=f"drop objects smaller than this (px; {default('min_size')})")
    if model:
        group.add_argument("--marker-threshold", type=float,
                           help="models with a distance head: nucleus cores (watershed seeds) are where it exceeds "
                                f"this ({default('marker_threshold')})")
        group.add_argument("--min-marker-size", type=values.count,
                           help=f"models with a distance head: drop seeds under this many px "
                                f"({default('min_marker_size')})")


def _engine_options(p) -> None:
    """How the model runs over an image: tiles, device, blending, flips, precision."""
    from ..inference.settings import BACKENDS, BLENDS, PRECISIONS, TileSettings

    defaults = TileSettings()
    p.add_argument("--tile", type=values.positive,
                   help=f"tile size in px, a multiple of the model's stride (default {defaults.tile_size})")
    p.add_argument("--overlap", type=values.count, help=f"px shared by neighbouring tiles (default {defaults.overlap})")
    p.add_argument("--batch-size", type=values.positive,
                   help=f"tiles per forward pass, halved on GPU out-of-memory (default {defaults.batch_size})")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="who runs the network on the CPU: auto picks the fastest installed runtime that matches "
                        "PyTorch at load (CUDA always uses torch)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="CPU runtimes: auto = OpenVINO's fp16, else bf16, where the CPU has it and the class maps "
                        "agree with float32 at load, else float32; fp16 / bf16 = asked for (OpenVINO); "
                        "int8 = opt-in: the low-resolution layers int8 by a measured plan (ONNX Runtime or "
                        "OpenVINO; about 0.1%% of pixels change); never chosen by auto")
    p.add_argument("--blend", choices=BLENDS, help=f"tile weight map (default {defaults.blend})")
    p.add_argument("--tta", action="store_true",
                   help="average over the 4 flips (4x slower; on the default's held-out images better on CoNSeP and "
                        "MoNuSeg, a little worse on TNBC: README, Default model)")
    p.add_argument("--network-zoom", type=float, metavar="ZOOM",
                   help="enlarge the image this much (0.5-2) on the model's pixel grid before the network runs; "
                        "the results come back to it (default: the model's measured choice; 1 for the default model, "
                        "whose held-out CoNSeP bPQ rises with 1.35 while its Dice and the other sets' fall: README, "
                        "Default model)")
    p.add_argument("--no-skip-background", action="store_true",
                   help="run the model on near-white glass tiles too (they are background by default)")
    p.add_argument("--no-amp", action="store_true", help="CUDA: run in float32 instead of float16 autocast")


def _examples(*lines: str) -> dict:
    """``add_parser`` arguments for a help page that ends with examples, as typed."""
    return {"epilog": "examples:\n" + "\n".join(f"  {line}" for line in lines),
            "formatter_class": argparse.RawDescriptionHelpFormatter}


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="segment images, folders or dataset folders", **_examples(
        "medseg predict slide_crop.tif --out results            # default model; results/labels, instances, ...",
        "medseg predict my_images/ --out results --pixel-size 0.5  # a folder of 20x images",
        "medseg predict CMU-1.svs --region 600,500,512,512 --out results   # a slide's region"))
    p.add_argument("inputs", nargs="+", help="image files, folders of images, or dataset folders")
    p.add_argument("--model", default="default", help="'default' (the shipped model; the default) or a .safetensors "
                                                       "checkpoint")
    p.add_argument("--out", required=True, help="output folder: OUT/labels/<stem>.tif")
    _engine_options(p)
    p.add_argument("--min-object-size", type=values.count, help="drop predicted objects under this many px")
    p.add_argument("--fill-holes", type=values.count, metavar="PX", help="fill holes up to this many px")
    p.add_argument("--probabilities", action="store_true",
                   help="also write OUT/probabilities/<stem>.npy (float16, classes x H x W, memory-mapped)")
    p.add_argument("--no-instances", action="store_true", help="write class maps only")
    p.add_argument("--pixel-size", type=values.pixel_size, metavar="UM",
                   help="µm per pixel of the inputs (e.g. 0.5 for 20x): images are resampled to the model's pixel "
                        "size and results mapped back; default: what each file records (slides, OME-TIFF, "
                        "TIFF resolution), else none; 'none': ignore recorded sizes")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--region", metavar="X,Y,W,H", help="whole slides: segment this region (level-0 px)")
    where.add_argument("--whole-slide", action="store_true", help="whole slides: segment all of it (glass skipped)")
    p.add_argument("--foreground-threshold", metavar="T", type=values.foreground_threshold,
                   help="nucleus probability above which a pixel is a nucleus (0-1), or 'argmax'; "
                        "default: the model's tuned threshold (medseg tune-threshold), argmax if it has none")
    p.add_argument("--class-weights", metavar="W,W,...|none", type=values.class_weights,
                   help="how a nucleus pixel's class is named: one weight per class (after background) on its "
                        "probability, or 'none' for the plain likeliest class; default: the model's own "
                        "(medseg tune-classes). Which pixels are nuclei does not change")
    _instance_options(p, model=True)
    p.set_defaults(func=cmd_predict)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="compare predicted label maps with ground truth", **_examples(
        "medseg predict my_dataset --out results && medseg evaluate results my_dataset   # predictions first",
        "medseg evaluate results my_dataset --json scores.json"))
    p.add_argument("pred_dir", help="folder with labels/<stem>.tif (as medseg predict writes)")
    p.add_argument("gt_dir", help="dataset folder with the ground truth")
    p.add_argument("--json", help="write all numbers to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace the --json file if it exists (never an input)")
    _instance_options(p)
    p.set_defaults(func=cmd_evaluate)


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert a PanNuke fold, a folder of images and nucleus masks, or QuPath "
                                       "outlines of an image, to a dataset folder",
                       **_examples('medseg convert pannuke "Fold 1" pannuke_fold1/',
                                   "medseg convert masks lab_export/ lab_dataset/   # b.png beside b_mask.png",
                                   "medseg convert geojson field_07.geojson --image field_07.png truth/ --classes default"
                                   "   # QuPath's File > Export objects",
                                   "medseg evaluate predictions/ truth/"))
    p.add_argument("format", choices=["pannuke", "masks", "geojson"], help="the source's format")
    p.add_argument("source", help="pannuke: a fold (images.npy, masks.npy, types.npy; flat or as downloaded); "
                                  "masks: a folder of images, each with its mask beside it (<stem>_mask.png or "
                                  "_masks, _labels, _label, _instances; PNG or TIFF; 0/255, 0/1 or an instance map); "
                                  "geojson: QuPath outlines (File > Export objects, in the image's pixels)")
    p.add_argument("out_dir", help="the dataset folder to write (pannuke: a folder of its own, outside the fold; "
                                   "masks: a new or empty folder; geojson: new, or one to add the image to)")
    p.add_argument("--image", help="geojson: the image the outlines were drawn on")
    p.add_argument("--classes", type=values.name_list, metavar="A,B,...",
                   help="geojson: the class names in their ids' order, or a model (default, a checkpoint) or "
                        "dataset folder to take them from, as medseg evaluate compares a model's classes with the "
                        "truth's (by default: background and the names the outlines use, sorted; an unclassified "
                        "outline is 'nucleus')")
    p.add_argument("--origin", type=values.xy, metavar="X,Y",
                   help="geojson: the image's top-left corner in the outlines' coordinates (a region of a slide)")
    p.add_argument("--overwrite", action="store_true",
                   help="geojson: replace the image's entry in the folder (outlines corrected again)")
    p.set_defaults(func=cmd_convert)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train or fine-tune a model from a YAML config")
    p.add_argument("config", help="the YAML config (e.g. configs/smoke.yaml)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a setting, e.g. --set epochs=5")
    p.add_argument("--resume", metavar="RESUME.safetensors", help="continue a run exactly from its resume file")
    p.add_argument("--time-limit", type=values.positive_float, metavar="MINUTES",
                   help="start no epoch that would end after this many minutes from now (judged by the longest "
                        "epoch so far), e.g. a cluster job's wall time less a margin; the run ends with its best "
                        "checkpoint and says how to continue it")
    p.add_argument("--overwrite", action="store_true",
                   help="train into an out_dir that holds an earlier run's checkpoints, replacing them "
                        "(its files this run would not replace are removed)")
    p.add_argument("--from-stage", metavar="NAME",
                   help="configs with stages: start at this stage (the ones before it have written their checkpoints)")
    p.set_defaults(func=cmd_train)


def _add_average(sub) -> None:
    from ..training.config import BATCHNORM, BN_CROPS

    p = sub.add_parser("average", help="average a fine-tuned model with the model it started from (weight by weight)")
    p.add_argument("start", help="'default' or the .safetensors checkpoint the fine-tuning started from")
    p.add_argument("tuned", help="the fine-tuned .safetensors checkpoint")
    p.add_argument("--weight", type=float, required=True, help="the fine-tuned model's share, 0 to 1")
    p.add_argument("--out", required=True, type=values.checkpoint_file,
                   help="the checkpoint to write (never overwritten)")
    p.add_argument("--batchnorm", choices=BATCHNORM, default="average",
                   help="batch-norm statistics averaged like the weights (default) or measured on the config's "
                        "training crops")
    p.add_argument("--threshold", default="tuned",
                   help="foreground threshold: the fine-tuned model's (tuned, default), the start model's (start), "
                        "tune (on the config's validation images) or a number")
    p.add_argument("--config", help="the fine-tuning's YAML config (for --batchnorm measure or --threshold tune)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config setting, as for train")
    p.add_argument("--crops", type=values.positive, default=BN_CROPS, help=f"training crops for --batchnorm measure "
                                                               f"(default {BN_CROPS})")
    p.add_argument("--device", default="cpu", help="for --batchnorm measure: cpu (default), cuda, cuda:N, mps")
    p.set_defaults(func=cmd_average)


def _tuning_options(p, what: str, tta: str) -> None:
    """What ``tune-threshold``, ``tune-nuclei`` and ``tune-classes`` share: the output, which images, flips, device."""
    p.add_argument("--out", required=True, type=values.checkpoint_file,
                   help=f"the checkpoint to write, with the {what} in its metadata")
    which = p.add_mutually_exclusive_group()  # both given: --groups had been ignored without a word
    which.add_argument("--groups", type=values.group_list,
                       help="source images to tune on (comma-separated; default: the model's validation images)")
    which.add_argument("--all-images", action="store_true", help="tune on every image of the data")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (never the input model)")
    p.add_argument("--tta", action="store_true", help=tta)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")


def _add_tune_threshold(sub) -> None:
    p = sub.add_parser("tune-threshold", help="tune a model's foreground threshold on labelled images", **_examples(
        "medseg tune-threshold default my_dataset --all-images --out tuned.safetensors   # the model first"))
    p.add_argument("model", help="'default' or a .safetensors checkpoint")
    p.add_argument("data", help="dataset folder with labels/")
    _tuning_options(p, "threshold", "tune the probabilities averaged over 4 flips")
    p.set_defaults(func=cmd_tune_threshold)


def _add_tune_classes(sub) -> None:
    p = sub.add_parser("tune-classes", help="weigh a model's classes where it names a nucleus's class (mPQ) on "
                                            "labelled images; the nuclei themselves stay as they are")
    p.add_argument("model", help="'default' or a .safetensors checkpoint")
    p.add_argument("data", help="dataset folder with the model's classes in labels/ and instances/")
    _tuning_options(p, "class weights", "tune for runs with test-time flips (4x the model time)")
    p.set_defaults(func=cmd_tune_classes)


def _add_tune_nuclei(sub) -> None:
    p = sub.add_parser("tune-nuclei", help="choose a model's nucleus post-processing (watershed seeds, smallest "
                                           "nucleus) on labelled images with instance maps")
    p.add_argument("model", help="'default' or a .safetensors checkpoint")
    p.add_argument("data", nargs="+", help="dataset folders with labels/ and instances/ (each is one set: the "
                                          "setting whose weakest set scores best is chosen)")
    _tuning_options(p, "settings", "tune for runs with test-time flips (4x the model time)")
    p.set_defaults(func=cmd_tune_nuclei)


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="summarise a checkpoint: classes, pixel size, training, figures (--json: all)")
    p.add_argument("model", nargs="?", default="default",
                   help="'default' (the shipped model; the default) or a .safetensors checkpoint")
    p.add_argument("--json", action="store_true", help="all the metadata as JSON (default: a short summary)")
    p.add_argument("--history", action="store_true",
                   help="with the JSON, every epoch's record (default: the best epoch's); implies --json")
    p.set_defaults(func=cmd_info)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="open napari with the sample image segmented and evaluated")
    p.add_argument("--model", default="default", help="'default' (the shipped model; the default) or a .safetensors "
                                                       "checkpoint")
    p.add_argument("--no-show", action="store_true", help="build the demo but do not start the event loop")
    p.add_argument("--screenshot", help="save a PNG of the window (works headless under xvfb-run)")
    p.set_defaults(func=cmd_demo)


def _add_web(sub) -> None:
    from ..inference.settings import BACKENDS

    p = sub.add_parser("web", help="the browser front: segment, count and check nuclei in a web page")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=values.port, default=7860, help="TCP port, 1-65535 (default 7860)")
    p.add_argument("--models", metavar="DIR", help="also offer the .safetensors checkpoints found in this folder")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="who runs the network on a CPU, as for predict (default auto: the fastest installed "
                        "runtime that agrees with PyTorch)")
    p.set_defaults(func=cmd_web)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="medseg", description=DESCRIPTION)
    # which release a result came from, for a bug report or a methods section
    parser.add_argument("--version", action="version", version=f"medseg (napari-medseg) {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_predict, _add_evaluate, _add_convert, _add_train, _add_average, _add_tune_threshold,
                _add_tune_nuclei, _add_tune_classes, _add_info, _add_demo, _add_web):
        add(sub)
    return parser
