"""``medseg``: predict, evaluate, convert, train, average, tune-threshold, tune-nuclei, tune-classes, info,
the napari demo and the browser front, from the shell."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from .errors import MedsegError
from .wording import counted


class ProgressLine:
    """A one-line progress bar on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, label: str):
        self.label, self.tty, self.t0, self.last = label, sys.stderr.isatty(), time.time(), -1.0

    def __call__(self, done: int, total: int) -> None:
        now = time.time()
        if done < total and now - self.last < (0.2 if self.tty else 5.0):
            return
        self.last = now
        width = 30
        filled = int(width * done / max(total, 1))
        line = f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {now - self.t0:.1f}s"
        sys.stderr.write(("\r" + line) if self.tty else line + "\n")
        if self.tty and done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


# image formats a microscope or an editor may leave in a folder that medseg does not read
UNREAD_IMAGE_SUFFIXES = (".bmp", ".gif", ".webp", ".jp2", ".j2k", ".heic", ".czi", ".nd2", ".lif", ".vsi", ".dcm")


def _collect_inputs(inputs: list[str]) -> list[Path]:
    """The image files ``inputs`` name (folders and dataset folders opened), each once."""
    from .io.dataset import is_dataset_folder
    from .io.images import IMAGE_SUFFIXES, LABEL_NAME_ENDINGS, file_stem

    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if is_dataset_folder(path):
            path = path / "images"
        if path.is_dir():
            from .io.slides import SLIDE_SUFFIXES

            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            # b_mask.png beside b.png is its annotation: segmented as an image, it had drawn 'fluorescence?' notes
            masks = [p for p in found if file_stem(p).lower().endswith(LABEL_NAME_ENDINGS)]
            if masks and len(masks) < len(found):
                found = [p for p in found if p not in masks]
                print(f"medseg: {path} also holds {counted(len(masks), 'label map')} named as such "
                      f"({', '.join(p.name for p in masks[:3])}{' ...' if len(masks) > 3 else ''}), not segmented; "
                      "give a file by name to segment it anyway.", file=sys.stderr)
            slides = sorted(p.name for p in path.iterdir()
                            if p.suffix.lower() in SLIDE_SUFFIXES and p.suffix.lower() not in IMAGE_SUFFIXES)
            others = sorted(p.name for p in path.iterdir() if p.suffix.lower() in UNREAD_IMAGE_SUFFIXES)
            if found and others:  # left out without a word, while the same file given alone was named
                print(f"medseg: {path} also holds {counted(len(others), 'image')} in formats not read here "
                      f"({', '.join(others[:3])}{' ...' if len(others) > 3 else ''}), skipped: save them as PNG or "
                      "TIFF to segment them.", file=sys.stderr)
            if found and slides:  # they had been left out without a word
                print(f"medseg: {path} also holds {counted(len(slides), 'whole slide')} ({', '.join(slides[:3])}"
                      f"{' ...' if len(slides) > 3 else ''}), not segmented with its images: give each slide file "
                      "with --region X,Y,W,H or --whole-slide.", file=sys.stderr)
            if not found:
                hint = (f" It holds whole slides ({', '.join(slides[:3])}{' ...' if len(slides) > 3 else ''}): "
                        "give each file with --region X,Y,W,H or --whole-slide." if slides else "")
                raise MedsegError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {path}.{hint}")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise MedsegError(f"'{item}' does not exist.")
    # a file named twice (or in a folder also given) is segmented once: twice was twice the time,
    # and 'wrote 2 class maps' for one
    unique = {os.path.realpath(f): f for f in reversed(files)}
    return [f for f in files if unique[os.path.realpath(f)] is f]


# option -> setting, for the options whose default is their settings class's (one place for each default):
# they parse to None when not given, and only the given ones reach the settings
TILE_OPTIONS = {"tile": "tile_size", "overlap": "overlap", "batch_size": "batch_size", "blend": "blend",
                "network_zoom": "network_zoom"}
CLEANUP_OPTIONS = {"min_object_size": "min_object_size", "fill_holes": "max_hole_size"}
INSTANCE_OPTIONS = {"min_distance": "min_distance", "min_size": "min_size", "marker_threshold": "marker_threshold",
                    "min_marker_size": "min_marker_size"}


def _given(args, options: dict[str, str]) -> dict:
    """``{setting: value}`` of the ``options`` given on the command line."""
    values = {setting: getattr(args, option, None) for option, setting in options.items()}
    return {setting: value for setting, value in values.items() if value is not None}


def _tile_settings(args):
    from .inference.settings import TileSettings

    return TileSettings(**_given(args, TILE_OPTIONS), tta=args.tta, skip_background=not args.no_skip_background,
                        amp=not args.no_amp)


def _instance_settings(args):
    from .nuclei.watershed import InstanceSettings

    return InstanceSettings(**_given(args, INSTANCE_OPTIONS))


def _batch_settings(args):
    """``medseg predict``'s options as the settings of ``predict_to_folder``."""
    from .inference.batch import BatchSettings
    from .inference.postprocess import PostprocessSettings

    return BatchSettings(_tile_settings(args), PostprocessSettings(**_given(args, CLEANUP_OPTIONS)),
                         nuclei=not args.no_instances, instance_overrides=_given(args, INSTANCE_OPTIONS),
                         probabilities=args.probabilities, foreground_threshold=args.foreground_threshold,
                         class_weights=args.class_weights,
                         pixel_size_um=args.pixel_size if args.pixel_size != NO_PIXEL_SIZE else None,
                         use_file_pixel_size=args.pixel_size != NO_PIXEL_SIZE)


NO_PIXEL_SIZE = "none"  # --pixel-size none: take every image at the model's pixel size


def _number_or_word(text: str, word: str, accept, expected: str) -> float | str:
    """An option that takes a number for which ``accept(number)`` holds, or ``word``."""
    if text == word:
        return text
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not accept(value):
        raise argparse.ArgumentTypeError(f"expected {expected} or '{word}'; got {text!r}")
    return value


def _pixel_size(text: str) -> float | str:
    """``--pixel-size``: µm per pixel a microscope gives (not a magnification: 100 would upscale a
    thing 400-fold for hours), or 'none'."""
    from .io.pixel_size import PLAUSIBLE_PIXEL_SIZE_UM

    low, high = PLAUSIBLE_PIXEL_SIZE_UM
    return _number_or_word(text, NO_PIXEL_SIZE, lambda v: low <= v <= high,
                           f"µm per pixel from {low} to {high} "
                           "(e.g. 0.5 for 20x, 0.25 for 40x; not the magnification)")


def _foreground_threshold(text: str) -> float | str:
    """``--foreground-threshold``: a probability strictly between 0 and 1, or 'argmax'."""
    from .inference.batch import ARGMAX

    return _number_or_word(text, ARGMAX, lambda v: 0 < v < 1, "a number between 0 and 1")


def _class_weights(text: str) -> list[float]:
    """``--class-weights``: 'none' (``[]``) or comma-separated numbers above 0."""
    if text == "none":
        return []
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(0 < v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"expected numbers above 0, comma-separated (one per class), or 'none'; "
                                         f"got {text!r}")
    return values


def _count(text: str) -> int:
    """A whole number of at least 0 (pixels, tiles)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"takes a whole number of at least 0, not '{text}'")
    return value


def _positive(text: str) -> int:
    """A whole number of at least 1."""
    value = _count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"takes a whole number of at least 1, not '{text}'")
    return value


def _positive_float(text: str) -> float:
    """A number above 0 (minutes, say)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"takes a number above 0, not '{text}'")
    return value


def _port(text: str) -> int:
    """A TCP port to listen on."""
    value = _count(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"takes a port from 1 to 65535, not '{text}'")
    return value


def _unscaled_pixel_size_note(args) -> None:
    """``--pixel-size UM`` for a model that records none (trained without ``pixel_size_um``): there
    is no size to rescale to, so the images run as they are; said, not ignored without a word."""
    from .models import read_meta, resolve_model_path

    if not isinstance(args.pixel_size, float):
        return
    try:
        recorded = read_meta(resolve_model_path(args.model)).pixel_size_um
    except MedsegError:
        return  # the model's load says what is wrong with it
    if recorded is None:
        print(f"medseg: note: the model records no pixel size, so --pixel-size {args.pixel_size:g} rescales nothing: "
              "images run at their own scale (train with pixel_size_um set, or fine-tune a model that records one)",
              file=sys.stderr)


def _checkpoint_file(text: str) -> str:
    """``--out`` of a command that writes a checkpoint: a ``.safetensors`` file (``avdir/`` had
    become a file named ``avdir``, and ``x.pt`` a safetensors file under a pickle's name)."""
    if text.endswith(("/", os.sep)) or Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder: give the checkpoint file to write, "
                                         f"e.g. {Path(text) / 'model.safetensors'}")
    if Path(text).suffix.lower() != ".safetensors":
        raise argparse.ArgumentTypeError(f"{text}: checkpoints are written as safetensors files; name it "
                                         f"{Path(text).with_suffix('.safetensors').name}")
    return text


def _name_list(text: str) -> list[str]:
    """``--classes``: comma-separated class names."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"names no class: '{text}'")
    return names


def _group_list(text: str) -> list[str]:
    """``--groups``: comma-separated source image names."""
    groups = [g.strip() for g in text.split(",") if g.strip()]
    if not groups:
        raise argparse.ArgumentTypeError(f"names no source image: '{text}'")
    return groups


def cmd_predict(args) -> int:
    from .inference.batch import predict_to_folder

    from .io.slides import SLIDE_SUFFIXES

    # vendor slides always take the slide path; a pyramidal TIFF does with --region / --whole-slide
    # (without, it streams like any large image)
    if args.region or args.whole_slide or any(Path(i).suffix.lower() in SLIDE_SUFFIXES for i in args.inputs):
        return _predict_slides(args)
    files = _collect_inputs(args.inputs)
    _unscaled_pixel_size_note(args)
    out = Path(args.out)
    failures, said, finished, unsized = 0, set(), 0, 0
    try:
        for done in predict_to_folder(files, out, args.model, _batch_settings(args), device=args.device,
                                      source=f"medseg predict --model {args.model}",
                                      progress_for=lambda i, n, file: ProgressLine(f"[{i}/{n}] {file.name}"),
                                      backend=args.backend, precision=args.precision):
            failures += _print_prediction(done, with_instances=not args.no_instances, said=said)
            unsized += done.skipped is None and done.pixel_size_um is None
            finished += 1
    except KeyboardInterrupt:
        if failures < finished < len(files):  # what is in OUT, whole: the interrupted image's results are not
            print(f"medseg predict: interrupted at image {finished + 1} of {len(files)} ({files[finished].name}); the "
                  f"results of the {counted(finished - failures, 'image')} before it are whole in {out}",
                  file=sys.stderr)
        raise
    if failures == len(files):  # nothing was written: not 'to OUT/labels', a folder it did not make
        what = "the file could not be read" if failures == 1 else f"none of the {failures} files could be read"
        print(f"wrote no class map: {what} (above)")
        return 1
    written = len(files) - failures
    _unknown_pixel_size_note(args, unsized, written)
    print(f"wrote {counted(written, 'class map')} to {out / 'labels'}"
          + ("" if args.no_instances else f", {counted(written, 'instance map')} to {out / 'instances'} and each "
             f"image's nuclei (a CSV table, QuPath GeoJSON outlines) to {out / 'nuclei'}"))
    earlier = _earlier_results(out, files)
    if earlier:  # kept (never removed: their images were not given), but 'medseg evaluate OUT' scores them too
        print(f"  {out} also holds earlier runs' results of {counted(len(earlier), 'other image')} ({', '.join(earlier[:3])}"
              f"{' ...' if len(earlier) > 3 else ''}), kept as they were", file=sys.stderr)
    return 1 if failures else 0


def _unknown_pixel_size_note(args, unsized: int, written: int) -> None:
    """Once a run, not under every file: images that record no pixel size (PNG and JPEG never do)
    were taken as the model's, unless --pixel-size said how to take them."""
    from .io.pixel_size import unknown_pixel_size_note
    from .models import read_meta, resolve_model_path

    if not unsized or args.pixel_size is not None:
        return
    model_size = read_meta(resolve_model_path(args.model)).pixel_size_um
    if model_size:
        what = "the image records" if written == 1 else f"{unsized} of the {written} images record"
        print("medseg: note: " + unknown_pixel_size_note(
            model_size, what, "give --pixel-size UM (0.5 at 20x), or --pixel-size none to take them as they are "
            "without this note"), file=sys.stderr)


def _earlier_results(out: Path, files: list[Path]) -> list[str]:
    """The stems of class maps in ``out/labels`` of images other than ``files`` (earlier runs')."""
    from .io.images import file_stem

    ours = {file_stem(f) for f in files}
    labels = out / "labels"
    held = sorted(p for p in labels.iterdir() if p.is_file() and not p.name.startswith(".")) if labels.is_dir() else []
    return [p.name for p in held if file_stem(p) not in ours]


def _predict_slides(args) -> int:
    """Whole slides (or a region of each) into OUT: zarr pyramids, OME-TIFFs, GeoJSON, CSV."""
    from .inference import Segmenter
    from .inference.batch import check_writable_folder
    from .inference.postprocess import PostprocessSettings
    from .inference.regions import Region, TissueSettings
    from .inference.slide import predict_slide
    from .io.images import file_stem
    from .io.outputs import OutputWriteError, check_given_once, check_not_input, check_unique_stems
    from .io.slide_outputs import check_no_slide_results
    from .io.slides import is_slide_path, open_slide
    from .memory import limit_allocator_arenas
    from .steps import Cancelled

    limit_allocator_arenas()  # before the runtime's threads exist: flat memory over the run (``memory``)

    slides = [Path(i) for i in args.inputs]
    missing = [str(s) for s in slides if not s.exists()]
    if missing:
        raise MedsegError(f"no such file: {', '.join(missing)}.")
    not_slides = [str(s) for s in slides if not is_slide_path(s)]
    if not_slides:
        raise MedsegError(f"--region / --whole-slide take whole-slide files; not slides: {', '.join(not_slides)}.")
    if not (args.region or args.whole_slide):
        raise MedsegError("a whole slide needs --region X,Y,W,H (level-0 px) or --whole-slide.")
    if args.probabilities:
        raise MedsegError("--probabilities is for images: a slide's would be classes x its whole size; its class "
                          "map and nuclei are written as pyramids instead (drop --probabilities).")
    region = Region.parse(args.region) if args.region else None
    out = Path(args.out)
    check_not_input(out, slides, ())
    # before hours of work on the first slide: a later one would be refused, or overwrite it
    check_given_once(slides, out, file_stem, "slide")
    check_unique_stems(slides, file_stem)
    for path in slides:
        check_no_slide_results(out, file_stem(path))
    check_writable_folder(out)  # once, before the model loads (not 'skipped' for each slide, naming a temp file)
    if args.pixel_size == NO_PIXEL_SIZE:  # before the model loads (it had taken 10 s to be told)
        raise MedsegError("--pixel-size none: slides are segmented at the pixel size they record; to override it "
                          "give a number (e.g. --pixel-size 0.25).")
    failed = _unreadable_slides(slides, region)  # said before the model loads (a cut-off file had waited for it)
    _unscaled_pixel_size_note(args)
    if len(failed) == len(slides):
        print(f"medseg: {len(failed)} of {counted(len(slides), 'slide')} not segmented: {', '.join(p.name for p in failed)}",
              file=sys.stderr)
        return 1
    # by the runtime alone where an earlier load on this machine recorded its choice: no torch in
    # this process (about 0.65 GB less over a whole slide); else loaded, checked and recorded
    segmenter = Segmenter.load(args.model, device=args.device, backend=args.backend, precision=args.precision,
                               recorded=True)
    if args.foreground_threshold is not None:
        segmenter.foreground_threshold = None if args.foreground_threshold == "argmax" else args.foreground_threshold
    if args.class_weights is not None:
        from .inference.batch import use_class_weights

        use_class_weights(segmenter, args.class_weights)
    # --no-skip-background: every block is segmented, glass and faint tissue alike
    tissue = TissueSettings(enabled=not args.no_skip_background)
    for path in slides:
        if path in failed:
            continue
        try:
            slide = open_slide(path)
            if args.pixel_size is not None:
                slide = replace(slide, pixel_size_um=args.pixel_size)
            result = predict_slide(segmenter, slide, out, region, progress=ProgressLine(path.name),
                                   settings=_tile_settings(args),
                                   instance_settings=segmenter.instance_settings_with(_given(args, INSTANCE_OPTIONS)),
                                   postprocess=PostprocessSettings(**_given(args, CLEANUP_OPTIONS)),
                                   nuclei=not args.no_instances, tissue_settings=tissue, flag="--out")
        except (Cancelled, OutputWriteError):  # the output folder (a full disk) fails every slide alike: stop
            raise
        except MedsegError as exc:  # a broken or odd slide: said, and the others still run
            print(f"medseg: skipped {path}: {exc}", file=sys.stderr)
            failed.append(path)
            continue
        counts = ", ".join(f"{name} {n}" for name, n in result.counts.items())
        found = "" if args.no_instances else f", {result.nuclei} nuclei ({counts})"
        r = result.region
        # without the tissue finder every block counts as tissue: '100% tissue' had been claimed of glass
        tissue_words = ("tissue not looked for (--no-skip-background: every block segmented)" if args.no_skip_background
                        else f"{100 * result.tissue_fraction:.0f}% tissue")
        print(f"{path.name}: region {r.x},{r.y},{r.width},{r.height}, {tissue_words}{found}")
        if region is not None and r != region:  # not silently: a typo'd size had run on the whole slide
            height, width = slide.shape
            print(f"  {path.name}: --region {args.region} reaches past the slide ({width}x{height} px): "
                  f"clipped to {r.x},{r.y},{r.width},{r.height}", file=sys.stderr)
        for note in result.notes:
            print(f"  {path.name}: {note}", file=sys.stderr)
        for kind, file in result.files.items():
            print(f"  {kind}: {file}")
    if failed:
        print(f"medseg: {len(failed)} of {counted(len(slides), 'slide')} not segmented: {', '.join(p.name for p in failed)}",
              file=sys.stderr)
    return 1 if failed else 0


def _unreadable_slides(slides: list[Path], region) -> list[Path]:
    """The slides that cannot be opened, or that ``region`` is not on, each said as skipped (their
    headers are read: nothing is decoded)."""
    from .io.slides import open_slide

    failed = []
    for path in slides:
        try:
            shape = open_slide(path).shape
            if region is not None:
                region.checked(shape)
        except MedsegError as exc:
            print(f"medseg: skipped {path}: {exc}", file=sys.stderr)
            failed.append(path)
    return failed


def _print_prediction(done, with_instances: bool, said: set | None = None) -> bool:
    """Prints what became of one file (on stderr, and only what needs saying); whether it was skipped.
    ``said``: the runtime's notes printed so far (each once a run, not under every file)."""
    from .nuclei.watershed import INSTANCE_MAX_PIXELS

    name = done.file.name
    if done.skipped is not None:
        print(f"medseg: skipped {done.file}: {done.skipped}", file=sys.stderr)
        return True
    report = done.report
    said = set() if said is None else said
    if done.nuclei_per_class is not None:  # as a slide's line and the web page say it
        per_class = done.nuclei_per_class
        print(f"{name}: {counted(sum(per_class.values()), 'nucleus', 'nuclei')}"
              + (f" ({', '.join(f'{c} {n}' for c, n in per_class.items())})" if set(per_class) - {"all"} else ""),
              flush=True)
    for note in done.runtime_notes:
        if note not in said:
            print(f"medseg: runtime: {note}", file=sys.stderr)
            said.add(note)
    notes = [note for note in report.notes if note not in done.runtime_notes]
    if report.skipped_background or notes:
        glass = [f"{report.skipped_background}/{report.tiles} tiles skipped as glass"] if report.skipped_background else []
        extra = "; ".join([*glass, *notes])  # not '0/25 tiles skipped as glass' before each note
        print(f"  {name}: {extra}", file=sys.stderr)
    for path in done.removed:
        print(f"  {name}: removed {path.parent.name}/{path.name}, an earlier run's, of the class map this run "
              "replaced", file=sys.stderr)
    if with_instances and done.instances is None:
        height, width = done.shape
        print(f"  {name}: instances not derived ({height}x{width} px is above "
              f"{INSTANCE_MAX_PIXELS / 1e6:.0f} Mpx; the class map was written)", file=sys.stderr)
    return False


def _fmt(value: float) -> str:
    return "   -  " if value != value else f"{value:6.4f}"  # NaN -> '-'


def cmd_evaluate(args) -> int:
    from .evaluation.report import evaluate_folders, report_json
    from .io.images import atomic_write
    from .io.outputs import check_file_target

    pred, truth = Path(args.pred_dir), Path(args.gt_dir)
    if (pred / "images").is_dir() and not (truth / "images").is_dir() and (truth / "labels").is_dir():
        raise MedsegError(f"{truth} has no images/ but {pred} has: the two look swapped. The predictions come "
                          "first: medseg evaluate PREDICTIONS DATASET.")
    if args.json:  # before the work: it had written over the ground truth it read
        check_file_target(args.json, [args.pred_dir, args.gt_dir], "--json", args.overwrite)
    report = evaluate_folders(args.pred_dir, args.gt_dir, _instance_settings(args), progress=ProgressLine("evaluate"))
    if report.get("note"):
        print(report["note"], file=sys.stderr)
    print(f"{'class':<14}{'IoU':>8}{'Dice':>8}{'Prec':>8}{'Recall':>8}{'PQ':>8}{'F1':>8}{'GT obj':>8}{'Pred obj':>9}")
    for name, row in report["per_class"].items():
        print(f"{name:<14}{_fmt(row['iou']):>8}{_fmt(row['dice']):>8}{_fmt(row['precision']):>8}"
              f"{_fmt(row['recall']):>8}{_fmt(row['pq']):>8}{_fmt(row['f1']):>8}{row['gt_objects']:>8}{row['pred_objects']:>9}")
    o = report["overall"]
    print(f"nucleus Dice {_fmt(o['nucleus_dice'])}  mIoU {_fmt(o['miou'])}  pixel accuracy {_fmt(o['pixel_accuracy'])}  "
          f"bPQ {_fmt(o['bpq'])}  mPQ {_fmt(o['mpq'])}  mPQ+ {_fmt(o['mpq_plus'])}  F1 {_fmt(o['f1'])}  "
          f"AJI {_fmt(o['aji'])}  ({counted(report['images'], 'image')}; aggregations in the JSON)")
    # the table lists background too: say which rows the means are over
    print("mIoU and mPQ: means over the nucleus classes (background left out); F1: detection at IoU > 0.5, all nuclei")
    if args.json:
        text = report_json(report)
        atomic_write(Path(args.json), lambda tmp: tmp.write_text(text))
        print(f"wrote {args.json}")
    return 0


def cmd_convert(args) -> int:
    if args.format == "geojson":
        return _convert_geojson(args)
    if args.image or args.classes or args.origin or args.overwrite:
        raise MedsegError("--image, --classes, --origin and --overwrite are for `medseg convert geojson`; a PanNuke "
                          "fold or a folder of masks holds its images, and goes to a folder of its own.")
    if args.format == "masks":
        return _convert_masks(args)
    from .io.pannuke import convert_pannuke

    out = convert_pannuke(args.source, args.out_dir, progress=ProgressLine("convert"))
    print(f"wrote dataset folder {out}")
    return 0


def _convert_masks(args) -> int:
    from .evaluation.mask_folder import masks_to_dataset

    done = masks_to_dataset(args.source, args.out_dir)
    read = ", ".join(f"{n} as {reading}" for reading, n in done.readings.items())
    print(f"wrote {counted(done.images, 'image')} into dataset folder {args.out_dir} (background, nucleus): masks "
          f"read {read}")
    for names, said in ((done.without_mask, "without a mask beside it left out"),
                        (done.without_image, "without an image of its name left out"),
                        (done.mostly_nucleus, "marking most of its image as nucleus (inverted? nucleus must be "
                                              "the non-zero value)")):
        if names:
            what = "mask" if names is not done.without_mask else "image"
            print(f"medseg: {counted(len(names), what)} {said}: {', '.join(names[:5])}"
                  f"{' ...' if len(names) > 5 else ''}", file=sys.stderr)
    print(f"medseg: fine-tune the default on it with data.datasets: [{{path: {args.out_dir}, labels: binary}}] "
          f"(its nuclei, not its classes), or score predictions: medseg evaluate PREDICTIONS/ {args.out_dir}",
          file=sys.stderr)
    return 0


def _convert_geojson(args) -> int:
    from .io.geojson_read import geojson_to_dataset

    if not args.image:
        raise MedsegError("convert geojson needs --image IMAGE: the image the outlines were drawn on (its size, "
                          "pixel size and pixels go into the dataset folder beside them).")
    done = geojson_to_dataset(args.source, args.image, args.out_dir, _classes_of(args.classes),
                              args.origin or (0.0, 0.0), overwrite=args.overwrite)
    from .io.geojson_read import MAX_NUCLEUS_AREA_UM2, OUTSIDE, TOO_LARGE

    per_class = ", ".join(f"{name} {n}" for name, n in done.counts.items())
    print(f"wrote '{done.stem}' into dataset folder {args.out_dir}: {counted(done.objects, 'outline')}"
          f"{f' ({per_class})' if per_class else ' (a field without nuclei)'}; classes {', '.join(done.classes[1:])}")
    outside, large = done.left_out[OUTSIDE], done.left_out[TOO_LARGE]
    if outside:
        print(f"medseg: {counted(outside, 'outline')} of {done.objects + outside + large} "
              f"{'lies' if outside == 1 else 'lie'} wholly outside the image, not painted: if most do, it is not the "
              "image they were drawn on (outlines of a slide region need its top-left corner as --origin X,Y)",
              file=sys.stderr)
    if large:
        print(f"medseg: {counted(large, 'outline')} larger than {MAX_NUCLEUS_AREA_UM2:g} µm² left out: regions "
              "drawn around nuclei, not nuclei", file=sys.stderr)
    if done.skipped:
        kinds = ", ".join(f"{n} {kind}" for kind, n in done.skipped.items())
        print(f"medseg: skipped objects that are not areas ({kinds})", file=sys.stderr)
    if not args.classes:
        print("medseg: to score a model's predictions against it, the classes must be the model's: convert with "
              "--classes default (or the model's checkpoint)", file=sys.stderr)
    return 0


def _classes_of(given: list[str] | None) -> list[str] | None:
    """``--classes``: names, or one model (``default``, a checkpoint) or dataset folder whose classes
    to take, so that the ground truth's ids are the model's (``medseg evaluate`` compares ids)."""
    if not given or len(given) > 1 or not (given[0] == "default" or Path(given[0]).exists()):
        return given
    from .io.dataset import read_classes
    from .models import read_meta, resolve_model_path

    if Path(given[0]).is_dir():
        return read_classes(Path(given[0]))[0]
    return list(read_meta(resolve_model_path(given[0])).classes)


def _xy(text: str) -> tuple[float, float]:
    """``--origin X,Y``: two numbers."""
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        x = y = math.nan
    if not (math.isfinite(x) and math.isfinite(y)):
        raise argparse.ArgumentTypeError(f"expected X,Y (two numbers, e.g. 12000,8000); got {text!r}")
    return x, y


def _epoch_line(prefix: str, update) -> str:
    m = update.metrics
    if not m:  # no validation images (data.val_fraction 0): the trainer keeps the lowest training loss
        return (f"{prefix}epoch {update.epoch}/{update.epochs}  train_loss {update.train_loss:.4f}  "
                f"(no validation images: the best epoch is the lowest training loss)  lr {update.lr:.2e}  "
                f"{'*best*' if update.best else ''}  {update.seconds:.0f}s")
    # class figures only where there are classes (a run on nucleus-only sets has none: they were 'nan')
    figures = [(name, m.get(key, float("nan"))) for name, key in
               (("val_mIoU", "miou"), ("val_mean_class_dice", "mean_dice"), ("val_nucleus_dice", "nucleus_dice"),
                ("val_bPQ", "bpq"))]
    shown = "  ".join(f"{name} {value:.4f}" for name, value in figures
                      if not (name in ("val_mIoU", "val_mean_class_dice") and math.isnan(value)))
    if "least_gain_over_start" in m:  # what monitor val_least_gain_over_start keeps the best epoch by
        shown += f"  least_gain_over_start {m['least_gain_over_start']:+.4f}"
    return (f"{prefix}epoch {update.epoch}/{update.epochs}  train_loss {update.train_loss:.4f}  "
            f"val_loss {update.val_loss:.4f}  {shown}  "
            f"lr {update.lr:.2e}  "
            f"{'*best*' if update.best else ''}  {update.seconds:.0f}s" + _per_set(m.get("sets")))


def _per_set(sets: dict | None) -> str:
    """Mixed-label runs: each validation set's nucleus Dice and bPQ on its own line."""
    if not sets:
        return ""
    return "".join(f"\n    {name}: nucleus_dice {s.get('nucleus_dice', float('nan')):.4f}  "
                   f"bPQ {s.get('bpq', float('nan')):.4f}" for name, s in sets.items())


class _TrainPrinter:
    """A training run on the terminal: a bar through each epoch, a line per epoch, a line per stage.
    Under torchrun only rank 0 prints stage and run lines."""

    def __init__(self, stages):
        self.stages, self.stage = stages, stages[0]
        self.main_rank = int(os.environ.get("RANK", "0")) == 0
        self.bar = ProgressLine("train")
        self.epochs_seen = 0  # a resumed run that had finished trains none

    def _prefix(self) -> str:
        return f"[{self.stage.name}] " if self.stage.name else ""

    def update(self, update) -> None:
        from .training import BatchDone, DataSplit, EpochDone, StartScored

        if isinstance(update, DataSplit):
            for line in update.lines():
                print(f"{self._prefix()}{line}", flush=True)
            if update.note:
                print(f"medseg train: note: {update.note}", file=sys.stderr, flush=True)
        elif isinstance(update, StartScored):
            print(f"{self._prefix()}{update.note}", flush=True)
        elif isinstance(update, BatchDone):
            self.bar.label = f"{self._prefix()}epoch {update.epoch}/{update.epochs or self.stage.config.epochs}"
            self.bar(update.step, update.steps)
        elif isinstance(update, EpochDone):
            self.epochs_seen += 1
            print(_epoch_line(self._prefix(), update), flush=True)
            self.bar.t0 = time.time()

    def stage_event(self, index, stage, result) -> None:
        self.stage = stage
        if not self.main_rank or not stage.name:
            return
        if result is None:
            start = stage.config.init_checkpoint or "new weights"
            gpu = (f" ({stage.config.for_device('cuda').epochs} on a CUDA GPU)"
                   if stage.config.on_cuda.get("epochs", stage.config.epochs) != stage.config.epochs else "")
            print(f"stage {index + 1}/{len(self.stages)} '{stage.name}': {stage.config.epochs} epochs{gpu} "
                  f"from {start} -> {stage.config.out_dir}", flush=True)
        else:
            print(f"stage '{stage.name}': {_result_words(stage.config, result)}", flush=True)

    def run_done(self, seed, result) -> None:
        if self.main_rank:
            print(f"seed {seed}: best epoch {result.best_epoch}; checkpoint {result.checkpoint}", flush=True)


def cmd_train(args) -> int:
    from .training import loop as training_loop
    from .training.checkpoints import check_fresh_run, remove_earlier_run_leftovers
    from .training.loop import TIME_LIMIT
    from .training.stages import load_train_stages, train_stages

    args.started = time.time()  # a resume file older than this is an earlier run's (--overwrite)
    stages = load_train_stages(args.config, list(args.set or []), args.from_stage)
    # --resume, or resume: in the config (the first running stage's only): the same run goes on
    resume = args.resume or stages[0].config.resume
    if resume:
        if stages[0].config.repeats > 1:
            raise MedsegError("--resume continues one run; with repeats each seed is a run of its own: resume "
                              "one with --set repeats=1 --set seed=N --set out_dir=<its seed_N folder>.")
        if not Path(resume).is_file():  # said before 'continuing in' a folder it would not go on in
            raise MedsegError(f"Resume file '{resume}' does not exist.")
        # the resume file belongs to the first stage that runs; its config must match it, and the
        # run goes on in the resume file's folder (its best checkpoint is there)
        stages[0].config.resume = str(resume)
        folder = str(Path(resume).resolve().parent)
        if Path(stages[0].config.out_dir).resolve() != Path(folder):
            print(f"medseg train: continuing in {folder}, the resumed run's folder (not {stages[0].config.out_dir})",
                  file=sys.stderr)
            stages[0].config.out_dir = folder
    elif not args.overwrite:
        check_fresh_run([Path(stage.config.out_dir) for stage in stages])
    elif int(os.environ.get("RANK", "0")) == 0:  # under torchrun the first process alone
        for stage in stages:
            for path in remove_earlier_run_leftovers(stage.config):
                print(f"--overwrite: removed {path}, an earlier run's file this run would not replace",
                      file=sys.stderr)
    printer = _TrainPrinter(stages)
    if stages[0].config.repeats > 1:  # a config without stages (stages refuse repeats)
        if args.time_limit:
            raise MedsegError("--time-limit stops one run; with repeats a seed cut short would skew the mean +- std: "
                              "run the seeds one by one (--set repeats=1 --set seed=N).")
        return _train_repeats(stages[0].config, printer)
    deadline = None if not args.time_limit else training_loop.clock() + 60 * args.time_limit
    try:
        done = train_stages(stages, on_update=printer.update, on_stage=printer.stage_event, deadline=deadline)
    except (Terminated, KeyboardInterrupt):
        _print_resume_hint(args, printer.stage, printer.stage.name == stages[0].name)
        raise
    if printer.main_rank:
        result, stage = done.results[-1], done.stages[len(done.results) - 1]
        if resume and not printer.epochs_seen:
            print(f"the run in {Path(resume).resolve().parent} had finished: nothing trained")
        if result.reason:
            print(f"stopped: {result.reason}")
        print(_result_words(stage.config, result))
        _say_tuned_threshold(result.checkpoint)
        if done.path is not None:
            print(f"wrote {done.path}")
        if (result.reason or "").startswith(TIME_LIMIT):
            _print_resume_hint(args, stage, stage.name == stages[0].name, "stopped by --time-limit")
    return 0


def _print_resume_hint(args, stage, first_stage: bool = True, what: str = "interrupted") -> None:
    """After an interrupted run (or one ``what`` else ended early): the command that continues it,
    with every ``--set`` it was given (without them the config would differ, or the run would go on
    in another folder)."""
    import shlex

    resume = Path(stage.config.out_dir) / "resume.safetensors"
    if int(os.environ.get("RANK", "0")) != 0:
        return
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    # a torchrun run resumes with as many processes (the trainer refuses another number)
    start = (["torchrun", "--nproc_per_node", str(world_size), "-m", "napari_medseg"] if world_size > 1
             else ["medseg"])
    words = start + ["train", str(args.config)] + [w for kv in (args.set or []) for w in ("--set", kv)]
    if not resume.is_file() or resume.stat().st_mtime < getattr(args, "started", 0):
        # before its first epoch ended: nothing of this run to resume (an earlier run's file would refuse it)
        if first_stage:
            print(f"{what} before the first epoch ended: nothing to resume; run the same command again",
                  file=sys.stderr)
            return
        # the stages before it are done: the same command would be refused (their folders hold models)
        best = Path(stage.config.out_dir) / "best.safetensors"
        words += ["--from-stage", stage.name] + (["--overwrite"] if best.is_file() else [])
        print(f"{what} before stage '{stage.name}' ended its first epoch (the stages before it are done); "
              f"start it again with: {shlex.join(words)}", file=sys.stderr)
        return
    words += (["--from-stage", stage.name] if stage.name else []) + ["--resume", str(resume)]
    print(f"resume with: {shlex.join(words)}", file=sys.stderr)


def _result_words(config, result) -> str:
    """'best epoch N; checkpoint P', saying so where P is that epoch averaged with the run's start."""
    from .training.config import AVERAGED_NAME, average_partner

    if result.checkpoint is None:  # stopped before an epoch ended (it had read 'best epoch -1; checkpoint None')
        return "no epoch ended: no checkpoint written"
    averaged = result.checkpoint.name == AVERAGED_NAME
    partner = average_partner(config)
    if averaged:  # what the average recorded: a start the run itself replaced is named as it was
        from .models import read_meta

        try:
            partner = (read_meta(result.checkpoint).training or {}).get("averaged", {}).get("start") or partner
        except MedsegError:
            pass
    how = f" (averaged with {partner}, {config.average_with_start:g} on this run)" if averaged else ""
    return f"best epoch {result.best_epoch}; checkpoint {result.checkpoint}{how}"


def _say_tuned_threshold(checkpoint) -> None:
    """The foreground threshold a run tuned at its end on its validation images (tune_threshold):
    said, with the caution ``tune-threshold`` gives, where it chose it on few images."""
    from .models import read_meta
    from .training.threshold import TRAINING_VALIDATION_IMAGES

    if checkpoint is None:
        return
    try:
        tuning = read_meta(checkpoint).metrics.get("threshold_tuning") or {}
    except MedsegError:
        return
    if tuning.get("data") == TRAINING_VALIDATION_IMAGES and "images" in tuning:
        print(f"foreground threshold {tuning['threshold']:.2f}, tuned on the {counted(tuning['images'], 'validation image')}")
        _few_images_caution(int(tuning["images"]))


def _train_repeats(config, printer: _TrainPrinter) -> int:
    from .training.repeat import format_summary, train_repeats

    done = train_repeats(config, on_update=printer.update, on_run=printer.run_done)
    if printer.main_rank:
        print(f"{len(done.runs)} runs (seeds {', '.join(map(str, done.seeds))}), best epochs, mean ± std: "
              f"{format_summary(done.summary)}")
        print(f"wrote {done.path}")
    return 0


def cmd_average(args) -> int:
    from .models import resolve_model_path
    from .training.average import average_checkpoints
    from .training.stages import load_train_stages

    if args.config and args.batchnorm != "measure" and args.threshold != "tune":
        raise MedsegError("--config is read for --batchnorm measure or --threshold tune, and neither was asked: "
                          "add one of them, or drop --config (weights, batch norm and the tuned model's threshold "
                          "are averaged / kept without it).")
    # stages share their data: the first stage's config has the split and the crops
    cfg = load_train_stages(args.config, list(args.set or []))[0].config if args.config else None
    done = average_checkpoints(resolve_model_path(args.start), resolve_model_path(args.tuned), args.weight, args.out,
                               cfg, batchnorm=args.batchnorm, threshold=args.threshold, crops=args.crops,
                               device=args.device, recorded_as=(args.start, args.tuned))
    norm = (f"batch norm measured on {done.bn_crops} training crops" if done.bn_crops
            else "batch norm averaged with the weights")
    chosen = "argmax (no threshold)" if done.threshold is None else f"{done.threshold:.2f}"
    tuned = (f" (tuned: pooled nucleus Dice {done.tuning['nucleus_dice']:.4f} on {done.tuning['images']} validation "
             "images)") if done.tuning else ""
    print(f"{1 - done.weight:.2f} x {args.start} + {done.weight:.2f} x {args.tuned}; {norm}; foreground threshold "
          f"{chosen}{tuned}")
    print(f"wrote {done.path}")
    return 0


FEW_TUNING_IMAGES = 5  # fewer than this: a value chosen fits those images more than the next ones


def _few_images_caution(images: int) -> None:
    if images < FEW_TUNING_IMAGES:
        print(f"medseg: caution: tuned on {counted(images, 'image')}; a choice made on so few may not hold on "
              "others (tune on more images, of several source images)", file=sys.stderr)


def _model_first(args) -> None:
    """The tuners take the model first: a dataset folder given there is said as such (it had been
    'Checkpoint ... is a folder, not a file')."""
    if Path(args.model).is_dir() and (Path(args.model) / "images").is_dir():
        raise MedsegError(f"'{args.model}' is a dataset folder: the model comes first, then the data: "
                          f"medseg {args.command} MODEL DATASET (MODEL: 'default' or a .safetensors file).")


def cmd_tune_threshold(args) -> int:
    from .evaluation.threshold import tune_checkpoint

    _model_first(args)
    result = tune_checkpoint(args.model, args.data, args.out, groups=args.groups, all_images=args.all_images,
                             tta=args.tta, device=args.device, overwrite=args.overwrite,
                             progress_for=lambda images: ProgressLine(f"tuning on {counted(images, 'image')}"))
    print(f"foreground threshold {result['threshold']:.2f}: pooled nucleus Dice {result['nucleus_dice']:.4f} "
          f"(argmax {result['argmax_nucleus_dice']:.4f}) on {counted(result['images'], 'image')}")
    _few_images_caution(result["images"])
    print(f"wrote {args.out}")
    return 0


def cmd_tune_classes(args) -> int:
    from .evaluation.class_choice import tune_classes_checkpoint

    _model_first(args)
    result = tune_classes_checkpoint(args.model, args.data, args.out, groups=args.groups, all_images=args.all_images,
                                     tta=args.tta, device=args.device, overwrite=args.overwrite,
                                     progress_for=lambda steps: ProgressLine("tune-classes: each image, then each weight"))
    before, tuned = result["before"], result["tuned"]
    own = result["own_weights"]
    print("class weights: " + ", ".join(f"{c} {w:g}" for c, w in zip(before["f1"], result["weights"]))
          + ("" if all(w == 1.0 for w in own) else
             " (the model's own: " + ", ".join(f"{c} {w:g}" for c, w in zip(before["f1"], own)) + ")"))
    print(f"on the {counted(result['images'], 'tuning image')}, from the model as it is: "
          f"mPQ {before['mpq']:.4f} -> {tuned['mpq']:.4f}, "
          f"class mIoU {before['miou']:.4f} -> {tuned['miou']:.4f}; bPQ {tuned['bpq']:.4f} (unchanged: the nuclei "
          "stay as they are)")
    print("  F1 per class: " + ", ".join(f"{c} {before['f1'][c]:.3f} -> {tuned['f1'][c]:.3f}" for c in before["f1"]))
    held = result.get("cross_validated")
    if held:
        print(f"each of the {result['source_images']} source images with weights chosen on the others only: "
              f"mPQ {before['mpq']:.4f} -> {held['mpq']:.4f}, class mIoU {before['miou']:.4f} -> {held['miou']:.4f}")
    else:
        print("one source image: no image left to check the choice on (give images of several)")
    print(f"wrote {args.out}")
    return 0


def cmd_tune_nuclei(args) -> int:
    from .evaluation.instance_tuning import tune_nuclei_checkpoint

    _model_first(args)
    result = tune_nuclei_checkpoint(args.model, args.data, args.out, groups=args.groups, all_images=args.all_images,
                                    tta=args.tta, device=args.device, overwrite=args.overwrite,
                                    progress_for=lambda steps: ProgressLine("tune-nuclei: each image, then each setting"))
    for name in result["left_out"]:
        print(f"{name}: none of its images is among the tuning images; left out")
    before, chosen = result["before"], result["settings"]
    words = {"marker_threshold": "marker threshold", "min_size": "smallest nucleus (px)",
             "min_marker_size": "smallest seed (px)"}
    print(f"chosen of {result['candidates']} settings (the weakest set's bPQ): "
          + ", ".join(f"{words[k]} {before['settings'][k]} -> {v}" for k, v in chosen.items()))
    for name, images in result["images"].items():
        print(f"  {name} ({counted(images, 'image')}): bPQ {before['bpq'][name]:.4f} -> {result['bpq'][name]:.4f}")
    _few_images_caution(min(result["images"].values(), default=0))
    print(f"wrote {args.out}")
    return 0


def cmd_info(args) -> int:
    from .models import read_meta, resolve_model_path

    path = resolve_model_path(args.model)
    meta = read_meta(path)
    if not (args.json or args.history):  # a summary first: the whole record is ~600 lines of JSON
        from .evaluation.checkpoint_summary import checkpoint_summary

        print("\n".join(checkpoint_summary(path, meta, args.model)))
        return 0
    data = {k: v for k, v in meta.__dict__.items() if k != "training"}
    data["model"] = meta.model.to_dict()
    training = dict(meta.training or {})
    history = training.get("history")
    if isinstance(history, list) and not args.history:  # every epoch's record: 40 kB of JSON; the best one here
        best = training.get("best_epoch")
        training["history"] = {"epochs": len(history), "best_epoch_record": next(
            (r for r in history if isinstance(r, dict) and r.get("epoch") == best), None),
            "all": "medseg info --history"}
    data["training"] = training
    print(json.dumps(data, indent=1, default=str))
    return 0


def cmd_demo(args) -> int:
    from .models import read_meta, resolve_model_path

    # said before napari starts, with exit 2: the demo had shown a missing checkpoint as a notification
    # and exited 0, and a screenshot into a missing folder failed once the whole demo had run
    read_meta(resolve_model_path(args.model))
    if args.screenshot and not Path(args.screenshot).resolve().parent.is_dir():
        raise MedsegError(f"--screenshot {args.screenshot}: the folder {Path(args.screenshot).parent} does not exist.")
    _check_display()
    # The napari face is imported only here, so the rest of the CLI runs headless.
    from ._napari.demo import run_demo

    run_demo(model=args.model, show=not args.no_show, screenshot=args.screenshot)
    return 0


def _check_display() -> None:
    """napari draws with OpenGL in a window, even with --no-show: on Linux without a display Qt
    aborted the process (exit 134, no message). Said first, with the way round it."""
    if not sys.platform.startswith("linux") or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return
    raise MedsegError("the demo opens napari, which needs a display, and none is set (DISPLAY / WAYLAND_DISPLAY). "
                      "On a machine without one run it in a virtual display: xvfb-run -a medseg demo --no-show "
                      "--screenshot demo.png")


def cmd_web(args) -> int:
    try:  # an optional extra: the rest of the CLI works without it
        from .web.app import serve
    except ImportError as exc:
        raise MedsegError(f"the browser front needs Gradio ({exc.name} is missing): "
                          'pip install "napari-medseg[web]"') from exc
    if args.models and not Path(args.models).is_dir():
        raise MedsegError(f"--models: '{args.models}' is not a folder.")
    _check_can_listen(args.host, args.port)
    print(f"napari-medseg web: http://{args.host}:{args.port}/ (Ctrl-C to stop)", flush=True)
    serve(args.host, args.port, args.models, args.device, backend=args.backend)
    return 0


def _check_can_listen(host: str, port: int) -> None:
    """Refuses a host this machine cannot listen on, or a port in use, before Gradio starts: it
    had said 'Cannot find empty port ... launch()' for both, after the models had been set up."""
    import socket

    address = host[1:-1] if host.startswith("[") and host.endswith("]") else host  # [::1], as a browser writes it
    try:
        family, _, _, _, where = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM,
                                                    flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise MedsegError(f"--host {host}: not an address or name this machine can resolve ({exc}); use 127.0.0.1 "
                          "(this machine only, the default), 0.0.0.0 (the network) or one of its addresses.") from exc
    _check_port_free(family, where, host)
    if where[0] != "127.0.0.1":  # Gradio checks the port there too, whatever the host
        _check_port_free(socket.AF_INET, ("127.0.0.1", port), "127.0.0.1")


def _check_port_free(family, where: tuple, host: str) -> None:
    """Binds a socket to ``where`` as the server will (then closes it); its failure in words."""
    import errno
    import socket

    port = where[1]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        if os.name != "nt":  # as the server binds: a port left in TIME_WAIT by a stopped server is free
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(where)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise MedsegError(f"port {port} on {host} is in use (another server, or an earlier medseg web "
                                  "still running); choose another with --port.") from exc
            if exc.errno == errno.EADDRNOTAVAIL:
                raise MedsegError(f"--host {host} is not an address of this machine; use 127.0.0.1 (this machine "
                                  "only, the default), 0.0.0.0 (the network) or one of its addresses.") from exc
            if exc.errno == errno.EACCES:
                raise MedsegError(f"port {port} on {host}: not allowed ({exc.strerror}; ports under 1024 need "
                                  "administrator rights); choose another with --port.") from exc
            raise MedsegError(f"cannot listen on {host} port {port}: {exc.strerror or exc}.") from exc


def _instance_options(parser, model: bool = False) -> None:
    """The watershed's settings; ``model``: a model runs, and its own settings are the default."""
    from .nuclei.watershed import InstanceSettings

    group = parser.add_argument_group(
        "instances from class maps (watershed)",
        None if model else "used only for a side without instance maps (evaluate reads them where they exist)")
    defaults = InstanceSettings()

    def default(name: str) -> str:
        value = getattr(defaults, name)
        return f"default: the model's own (medseg tune-nuclei), else {value}" if model else f"default {value}"

    group.add_argument("--min-distance", type=_count,
                       help=("models without a distance head: " if model else "")
                       + f"minimum distance between nucleus centres (px; {default('min_distance')})")
    group.add_argument("--min-size", type=_count, help=f"drop objects smaller than this (px; {default('min_size')})")
    if model:
        group.add_argument("--marker-threshold", type=float,
                           help="models with a distance head: nucleus cores (watershed seeds) are where it exceeds "
                                f"this ({default('marker_threshold')})")
        group.add_argument("--min-marker-size", type=_count,
                           help=f"models with a distance head: drop seeds under this many px "
                                f"({default('min_marker_size')})")


def _engine_options(p) -> None:
    """How the model runs over an image: tiles, device, blending, flips, precision."""
    from .inference.settings import BACKENDS, BLENDS, PRECISIONS, TileSettings

    defaults = TileSettings()
    p.add_argument("--tile", type=_positive,
                   help=f"tile size in px, a multiple of the model's stride (default {defaults.tile_size})")
    p.add_argument("--overlap", type=_count, help=f"px shared by neighbouring tiles (default {defaults.overlap})")
    p.add_argument("--batch-size", type=_positive,
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
    p.add_argument("--min-object-size", type=_count, help="drop predicted objects under this many px")
    p.add_argument("--fill-holes", type=_count, metavar="PX", help="fill holes up to this many px")
    p.add_argument("--probabilities", action="store_true",
                   help="also write OUT/probabilities/<stem>.npy (float16, classes x H x W, memory-mapped)")
    p.add_argument("--no-instances", action="store_true", help="write class maps only")
    p.add_argument("--pixel-size", type=_pixel_size, metavar="UM",
                   help="µm per pixel of the inputs (e.g. 0.5 for 20x): images are resampled to the model's pixel "
                        "size and results mapped back; default: what each file records (slides, OME-TIFF, "
                        "TIFF resolution), else none; 'none': ignore recorded sizes")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--region", metavar="X,Y,W,H", help="whole slides: segment this region (level-0 px)")
    where.add_argument("--whole-slide", action="store_true", help="whole slides: segment all of it (glass skipped)")
    p.add_argument("--foreground-threshold", metavar="T", type=_foreground_threshold,
                   help="nucleus probability above which a pixel is a nucleus (0-1), or 'argmax'; "
                        "default: the model's tuned threshold (medseg tune-threshold), argmax if it has none")
    p.add_argument("--class-weights", metavar="W,W,...|none", type=_class_weights,
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
    p.add_argument("--classes", type=_name_list, metavar="A,B,...",
                   help="geojson: the class names in their ids' order, or a model (default, a checkpoint) or "
                        "dataset folder to take them from, as medseg evaluate compares a model's classes with the "
                        "truth's (by default: background and the names the outlines use, sorted; an unclassified "
                        "outline is 'nucleus')")
    p.add_argument("--origin", type=_xy, metavar="X,Y",
                   help="geojson: the image's top-left corner in the outlines' coordinates (a region of a slide)")
    p.add_argument("--overwrite", action="store_true",
                   help="geojson: replace the image's entry in the folder (outlines corrected again)")
    p.set_defaults(func=cmd_convert)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train or fine-tune a model from a YAML config")
    p.add_argument("config", help="the YAML config (e.g. configs/smoke.yaml)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a setting, e.g. --set epochs=5")
    p.add_argument("--resume", metavar="RESUME.safetensors", help="continue a run exactly from its resume file")
    p.add_argument("--time-limit", type=_positive_float, metavar="MINUTES",
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
    from .training.config import BATCHNORM, BN_CROPS

    p = sub.add_parser("average", help="average a fine-tuned model with the model it started from (weight by weight)")
    p.add_argument("start", help="'default' or the .safetensors checkpoint the fine-tuning started from")
    p.add_argument("tuned", help="the fine-tuned .safetensors checkpoint")
    p.add_argument("--weight", type=float, required=True, help="the fine-tuned model's share, 0 to 1")
    p.add_argument("--out", required=True, type=_checkpoint_file, help="the checkpoint to write (never overwritten)")
    p.add_argument("--batchnorm", choices=BATCHNORM, default="average",
                   help="batch-norm statistics averaged like the weights (default) or measured on the config's "
                        "training crops")
    p.add_argument("--threshold", default="tuned",
                   help="foreground threshold: the fine-tuned model's (tuned, default), the start model's (start), "
                        "tune (on the config's validation images) or a number")
    p.add_argument("--config", help="the fine-tuning's YAML config (for --batchnorm measure or --threshold tune)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config setting, as for train")
    p.add_argument("--crops", type=_positive, default=BN_CROPS, help=f"training crops for --batchnorm measure "
                                                               f"(default {BN_CROPS})")
    p.add_argument("--device", default="cpu", help="for --batchnorm measure: cpu (default), cuda, cuda:N, mps")
    p.set_defaults(func=cmd_average)


def _tuning_options(p, what: str, tta: str) -> None:
    """What ``tune-threshold``, ``tune-nuclei`` and ``tune-classes`` share: the output, which images, flips, device."""
    p.add_argument("--out", required=True, type=_checkpoint_file,
                   help=f"the checkpoint to write, with the {what} in its metadata")
    which = p.add_mutually_exclusive_group()  # both given: --groups had been ignored without a word
    which.add_argument("--groups", type=_group_list,
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
    from .inference.settings import BACKENDS

    p = sub.add_parser("web", help="the browser front: segment, count and check nuclei in a web page")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=_port, default=7860, help="TCP port, 1-65535 (default 7860)")
    p.add_argument("--models", metavar="DIR", help="also offer the .safetensors checkpoints found in this folder")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="who runs the network on a CPU, as for predict (default auto: the fastest installed "
                        "runtime that agrees with PyTorch)")
    p.set_defaults(func=cmd_web)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="medseg", description=__doc__.replace("``", ""))  # plain text on a terminal
    # which release a result came from, for a bug report or a methods section
    parser.add_argument("--version", action="version", version=f"medseg (napari-medseg) {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_predict, _add_evaluate, _add_convert, _add_train, _add_average, _add_tune_threshold,
                _add_tune_nuclei, _add_tune_classes, _add_info, _add_demo, _add_web):
        add(sub)
    return parser


def _os_error_message(exc: OSError) -> str:
    """The file an operating-system error is about, then why."""
    if exc.filename is None:
        return str(exc)
    files = f"{exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 is not None else "")
    return f"{files}: {exc.strerror or exc}"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that every ``finally`` and temp-file cleanup runs."""


# options whose value is comma-separated numbers, the first of which may be negative: argparse
# takes '-10,0,100,100' for an option of its own ('--region: expected one argument')
NUMBER_LIST_OPTIONS = ("--region", "--class-weights")
NEGATIVE_NUMBER = re.compile(r"-\.?\d")


def _negative_values_joined(argv: list[str]) -> list[str]:
    """``--region -10,0,100,100`` as ``--region=-10,0,100,100``, which argparse reads as its value
    (then said inside or outside the slide like any region); nothing after ``--`` is touched."""
    words, i = list(argv), 0
    while i < len(words) - 1 and words[i] != "--":
        if words[i] in NUMBER_LIST_OPTIONS and NEGATIVE_NUMBER.match(words[i + 1]):
            words[i:i + 2] = [f"{words[i]}={words[i + 1]}"]
        i += 1
    return words


def _on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Runs one ``medseg`` command; returns its exit status. A ``MedsegError`` (a problem the user can
    fix) or an ``OSError`` is printed as one line; anything else is a bug and keeps its traceback.
    Ctrl-C and SIGTERM end it cleanly: no temp file is left behind, nothing half-written is visible."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on a hub download
    try:
        args = build_parser().parse_args(_negative_values_joined(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # --help, or a bad argument: argparse has printed why
        return exc.code
    # only where no one else handles SIGTERM (signals can be set in the main thread only)
    handle = (threading.current_thread() is threading.main_thread()
              and signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None))
    if handle:
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _run(args)
    finally:
        if handle:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


LINGER_S = 10.0  # how long a torchrun rank waits for the first to say an error they share (``_said_late``)


def _said_by_another_rank() -> bool:
    """Under torchrun, whether this process's error is said by another: each of a node's processes
    meets the same error in the setup (the same config, files and options: 'epochs must be an
    integer' had been printed once per process), so its first process (LOCAL_RANK 0) says it.
    Once the processes have joined their group, an error may be this process's own: said by each."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        return False
    dist = sys.modules.get("torch.distributed")
    return not (dist is not None and dist.is_available() and dist.is_initialized())


def _rank_words() -> str:
    """' (rank N)' where a process other than torchrun's first says an error."""
    rank = os.environ.get("RANK", "0")
    return "" if rank == "0" else f" (rank {rank})"


def _said_late(code: int, message: str) -> int:
    """A rank whose error another should say: pauses, so that torchrun (which ends the others once
    one process exits) does not end the one that says it before it has; ended in the pause, it
    exits quietly with the same status. Still running after it, the first process has not met
    this error (a process of its own, e.g. a file only this one cannot read): it says it then."""
    try:
        time.sleep(LINGER_S)
    except KeyboardInterrupt:  # torchrun's SIGTERM (``Terminated``) once the first has exited: said there
        return code
    print(message, file=sys.stderr)
    return code


def _run(args) -> int:
    """``args.func(args)``, its errors as messages and exit statuses (see ``main``)."""
    try:
        return args.func(args)
    except MedsegError as exc:
        message = f"medseg {args.command}{_rank_words()}: error: {exc}"
        if _said_by_another_rank():
            return _said_late(2, message)
        print(message, file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went (``medseg info default | head``): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would fail too
        return 141  # as a process ended by SIGPIPE
    except OSError as exc:
        message = f"medseg {args.command}{_rank_words()}: error: {_os_error_message(exc)}"
        if _said_by_another_rank():
            return _said_late(2, message)
        print(message, file=sys.stderr)
        return 2
    except Terminated:
        print(f"medseg {args.command}: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"medseg {args.command}: interrupted", file=sys.stderr)
        return 130
