"""`medseg` end to end on real data: train (smoke) -> predict -> evaluate -> info."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from napari_medseg.cli import main
from napari_medseg.io import read_label_map


def test_train_predict_evaluate_round_trip(small_consep, tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(["train", str(Path(__file__).parents[1] / "configs" / "smoke.yaml"), "--set", f"data.dataset=[{small_consep}]", "--set", f"out_dir={run}",
               "--set", "data.val_fraction=0.34", "--set", "data.samples_per_epoch=0"])  # the crops there are
    assert rc == 0
    out = capsys.readouterr().out
    assert "epoch 1/1" in out and "best epoch 1" in out
    # before the first epoch: what trains and which source image validates (3 sources, 0.34 held out: 1)
    assert re.search(r"training on 4 images of 2 source images; validating on 2 images of 1 \(train_\d\)", out)
    ckpt = run / "best.safetensors"
    assert ckpt.is_file()

    pred = tmp_path / "pred"
    assert main(["predict", str(small_consep), "--model", str(ckpt), "--out", str(pred), "--tile", "128",
                 "--overlap", "32", "--device", "cpu"]) == 0
    written = sorted(p.stem for p in (pred / "labels").glob("*.tif"))
    assert written == sorted(p.stem for p in (small_consep / "images").glob("*.png"))
    labels = read_label_map(pred / "labels" / f"{written[0]}.tif")
    assert labels.shape == (256, 256) and labels.dtype == np.uint8 and labels.max() < 5

    report_path = tmp_path / "report.json"
    assert main(["evaluate", str(pred), str(small_consep), "--json", str(report_path)]) == 0
    printed = capsys.readouterr().out
    assert "epithelial" in printed and "mIoU" in printed
    assert "background left out" in printed  # the table has a background row; the means do not
    report = json.loads(report_path.read_text())
    assert set(report["overall"]) >= {"nucleus_dice", "miou", "pixel_accuracy"}
    assert set(report["per_class"]) == {"background", "other", "inflammatory", "epithelial", "spindle"}
    assert set(report["per_image"]) == set(written)
    assert 0.0 <= report["overall"]["pixel_accuracy"] <= 1.0

    assert main(["info", str(ckpt), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["classes"][3] == "epithelial" and info["model"]["encoder"] == "resnet18"


def test_train_says_when_tiles_named_by_coordinates_split_one_slide(small_consep, tmp_path, capsys):
    """Tiles '<slide>_<x>_<y>' under the default pattern group by column ('<slide>_<x>'): one slide's
    tiles on both sides of the split. Said before the first epoch, with the pattern that keeps each
    slide whole; given that pattern, the note goes and whole slides are held out."""
    import shutil

    tiles = tmp_path / "tiles"
    for sub in ("images", "labels", "instances"):
        (tiles / sub).mkdir(parents=True)
    shutil.copy(small_consep / "classes.json", tiles / "classes.json")
    stems = sorted(p.stem for p in (small_consep / "images").glob("*.png"))
    names = [f"slide{s}_{x}_{y}" for s in "AB" for x, y in ((0, 0), (256, 0), (0, 256))]
    for stem, name in zip(stems, names):
        for sub, ext in (("images", ".png"), ("labels", ".tif"), ("instances", ".tif")):
            shutil.copy(small_consep / sub / f"{stem}{ext}", tiles / sub / f"{name}{ext}")
    args = ["train", str(Path(__file__).parents[1] / "configs" / "smoke.yaml"), "--set", f"data.dataset=[{tiles}]",
            "--set", "data.val_fraction=0.34", "--set", "data.samples_per_epoch=16"]
    assert main(args + ["--set", f"out_dir={tmp_path / 'by_column'}"]) == 0
    captured = capsys.readouterr()
    assert "end in multiples of 256" in captured.err and "'^(.*)_\\d+_\\d+$'" in captured.err
    # slideA_0, slideA_256, slideB_0, slideB_256: one of them held out, its slide's other column trains
    assert re.search(r"training on 4 images of 3 source images; validating on 2 images of 1 \(slide[AB]_(0|256)\)",
                     captured.out)
    assert main(args + ["--set", f"out_dir={tmp_path / 'by_slide'}", "--set", r"data.group_pattern=^(.*)_\d+_\d+$"]) == 0
    captured = capsys.readouterr()
    assert "note" not in captured.err
    assert re.search(r"training on 3 images of 1 source image; validating on 3 images of 1 \(slide[AB]\)",
                     captured.out)


def test_info_shows_how_the_default_was_trained():
    """README: 'a checkpoint's metadata: classes, training, metrics'; training had been left out."""
    import subprocess
    import sys

    shown = json.loads(subprocess.run([sys.executable, "-m", "napari_medseg", "info", "--json"], capture_output=True,
                                      text=True, check=True).stdout)
    training = shown["training"]
    assert training["config"]["model"]["encoder"] == "mobilenet_v2" and training["best_epoch"] == 43
    assert training["history"]["epochs"] == 43 and training["history"]["best_epoch_record"]["epoch"] == 43
    full = json.loads(subprocess.run([sys.executable, "-m", "napari_medseg", "info", "--history"], capture_output=True,
                                     text=True, check=True).stdout)
    assert len(full["training"]["history"]) == 43 and full["training"]["history"][0]["epoch"] == 1


def test_evaluate_ground_truth_against_itself_is_perfect(small_consep, tmp_path):
    report_path = tmp_path / "r.json"
    assert main(["evaluate", str(small_consep), str(small_consep), "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["overall"]["miou"] == 1.0 and report["overall"]["nucleus_dice"] == 1.0


def test_predict_with_default_model_on_a_real_image(consep, tmp_path):
    out = tmp_path / "out"
    assert main(["predict", str(consep / "images" / "train_19_005.png"), "--out", str(out)]) == 0
    labels = read_label_map(out / "labels" / "train_19_005.tif")
    truth = read_label_map(consep / "labels" / "train_19_005.tif")
    dice = 2 * ((labels > 0) & (truth > 0)).sum() / ((labels > 0).sum() + (truth > 0).sum())
    assert dice > 0.6  # held-out image; all-nucleus would give 0.52
    assert json.loads((out / "classes.json").read_text())["classes"][2] == "inflammatory"


@pytest.mark.parametrize("case", ["missing_input", "pickle_model", "bad_overlap", "mismatched_eval"])
def test_cli_errors_are_clear(tmp_path, small_consep, tiny_checkpoint, capsys, case):
    import torch

    if case == "missing_input":  # a user's mistake: its message and exit 2, as every other (README)
        args, expected = ["predict", str(tmp_path / "nothing.png"), "--out", str(tmp_path / "o")], "does not exist"
    elif case == "pickle_model":
        bad = tmp_path / "m.pt"
        torch.save({"x": torch.zeros(1)}, bad)
        args, expected = ["predict", str(small_consep), "--model", str(bad), "--out", str(tmp_path / "o")], "pickle"
    elif case == "bad_overlap":
        args = ["predict", str(small_consep), "--model", str(tiny_checkpoint), "--out", str(tmp_path / "o"),
                "--tile", "64", "--overlap", "64"]
        expected = "smaller than the tile"
    else:
        wrong = tmp_path / "pred"
        (wrong / "labels").mkdir(parents=True)
        (wrong / "classes.json").write_text('{"classes": ["background", "tumour", "stroma"]}')
        args, expected = ["evaluate", str(wrong), str(small_consep)], "differ from the ground truth"
    assert main(args) == 2
    assert expected in capsys.readouterr().err


def test_predict_streams_a_pyramidal_tiff_with_every_engine_option(consep, tiny_checkpoint, tmp_path, capsys):
    import tifffile

    from napari_medseg.inference import PostprocessSettings, Segmenter, TileSettings
    from napari_medseg.io import read_image
    from napari_medseg.io.images import read_label_map

    image = np.tile(read_image(consep / "images" / "train_5_000.png"), (1, 2, 1))  # 256 x 512
    path = tmp_path / "slide.ome.tif"
    with tifffile.TiffWriter(path) as tw:  # a pyramid: always opened lazily
        tw.write(image, subifds=1, tile=(128, 128), metadata={"axes": "YXS"})
        tw.write(image[::2, ::2], subfiletype=1, tile=(128, 128))
    out = tmp_path / "pred"
    args = ["predict", str(path), "--model", str(tiny_checkpoint), "--out", str(out), "--device", "cpu",
            "--tile", "128", "--overlap", "32", "--batch-size", "3", "--blend", "cosine", "--tta",
            "--no-skip-background", "--min-object-size", "30", "--fill-holes", "20", "--probabilities",
            "--precision", "fp32"]  # float32 whichever runtime auto picks: equal to PyTorch's below
    assert main(args) == 0
    settings = TileSettings(128, 32, 3, blend="cosine", tta=True, skip_background=False)
    seg = Segmenter.load(tiny_checkpoint, device="cpu")
    expected = seg.segment(image, settings, postprocess=PostprocessSettings(30, 20))
    np.testing.assert_array_equal(read_label_map(out / "labels" / "slide.tif"), expected)
    probs = np.load(out / "probabilities" / "slide.npy", mmap_mode="r")
    assert probs.shape == (5, 256, 512) and probs.dtype == np.float16
    np.testing.assert_allclose(np.asarray(probs, np.float32), seg.probabilities(image, settings), atol=1e-3)
    assert not list((out / "probabilities").glob(".*part"))  # no temporary file left behind
    assert (out / "instances" / "slide.tif").is_file()


def _break_the_engine(monkeypatch, error):
    from napari_medseg.inference import Segmenter

    def broken(self, *args, **kwargs):  # every predict path (class maps, nuclei) runs this generator
        raise error
        yield

    monkeypatch.setattr(Segmenter, "iter_segment", broken)


def _predict_with_probabilities(image, checkpoint, out):
    return main(["predict", str(image), "--model", str(checkpoint), "--out", str(out), "--device", "cpu", "--probabilities"])


def test_predict_failure_leaves_no_partial_probability_file(consep, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from napari_medseg.inference import InferenceMemoryError

    _break_the_engine(monkeypatch, InferenceMemoryError("simulated failure inside the engine"))
    out = tmp_path / "pred"
    rc = _predict_with_probabilities(consep / "images" / "train_5_000.png", tiny_checkpoint, out)
    assert rc != 0 and "simulated failure" in capsys.readouterr().err
    # neither the .npy nor a hidden .part file, nor the folders made for them (empty ones had been left)
    assert not (out / "probabilities").exists() and not out.exists()


def test_a_rerun_into_the_same_folder_leaves_no_outdated_nuclei_or_probabilities(consep, tiny_checkpoint, tmp_path,
                                                                                   capsys):
    """A second run that makes no nuclei (or no probabilities) removes the first run's, which
    described the class map it replaced: ``medseg evaluate`` had scored those old nuclei."""
    out, image = tmp_path / "pred", consep / "images" / "train_5_000.png"
    assert _predict_with_probabilities(image, tiny_checkpoint, out) == 0
    assert (out / "instances" / "train_5_000.tif").is_file() and (out / "probabilities" / "train_5_000.npy").is_file()
    tables = [out / "nuclei" / "train_5_000.csv", out / "nuclei" / "train_5_000.geojson"]
    assert all(path.is_file() for path in tables)
    capsys.readouterr()
    assert main(["predict", str(image), "--model", str(tiny_checkpoint), "--out", str(out), "--no-instances",
                 "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "removed instances/train_5_000.tif" in err and "removed probabilities/train_5_000.npy" in err
    assert "removed nuclei/train_5_000.csv" in err and "removed nuclei/train_5_000.geojson" in err
    assert (out / "labels" / "train_5_000.tif").is_file()
    assert not (out / "instances" / "train_5_000.tif").exists() and not (out / "probabilities" / "train_5_000.npy").exists()
    assert not any(path.exists() for path in tables)


def test_each_images_nuclei_come_as_a_table_and_qupath_outlines(consep, tmp_path, capsys):
    """Plain images had no per-nucleus table or outlines from the CLI (slides alone had them)."""
    import csv


    out, image = tmp_path / "pred", consep / "images" / "train_19_005.png"
    assert main(["predict", str(image), "--out", str(out), "--pixel-size", "0.25", "--device", "cpu"]) == 0
    assert f"each image's nuclei (a CSV table, QuPath GeoJSON outlines) to {out / 'nuclei'}" in capsys.readouterr().out
    instances = read_label_map(out / "instances" / "train_19_005.tif")
    classes = read_label_map(out / "labels" / "train_19_005.tif")
    with open(out / "nuclei" / "train_19_005.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ids = np.unique(instances[instances > 0])
    assert len(ids) > 10 and sorted(int(r["label"]) for r in rows) == ids.tolist()
    names = json.loads((out / "classes.json").read_text())["classes"]
    for row in rows[:20]:  # each as measured on the maps written beside it
        inside = instances == int(row["label"])
        assert int(row["area"]) == inside.sum()
        assert float(row["area_um2"]) == pytest.approx(inside.sum() * 0.25 ** 2)
        assert row["class"] == names[np.bincount(classes[inside]).argmax()]
        assert float(row["centroid_y"]) == pytest.approx(np.argwhere(inside)[:, 0].mean())
    features = json.loads((out / "nuclei" / "train_19_005.geojson").read_text())["features"]
    assert len(features) == len(rows)
    assert {f["properties"]["classification"]["name"] for f in features} <= set(names[1:])


@pytest.mark.parametrize("error", [RuntimeError("a bug inside the engine"), KeyboardInterrupt()])
def test_a_bug_keeps_its_traceback_and_ctrl_c_exits_130_leaving_no_partial_file(
        consep, tiny_checkpoint, tmp_path, monkeypatch, capsys, error):
    _break_the_engine(monkeypatch, error)
    out = tmp_path / "pred"
    image = consep / "images" / "train_5_000.png"
    if isinstance(error, KeyboardInterrupt):
        assert _predict_with_probabilities(image, tiny_checkpoint, out) == 130
        assert capsys.readouterr().err.strip().splitlines()[-1] == "medseg predict: interrupted"
    else:  # not a MedsegError: main does not swallow it
        with pytest.raises(RuntimeError, match="a bug inside the engine"):
            _predict_with_probabilities(image, tiny_checkpoint, out)
    assert not (out / "probabilities").exists() and not out.exists()  # nor the (empty) folders made for them


def test_an_os_error_names_its_file(small_consep, tmp_path, capsys):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the report's folder should be")
    assert main(["evaluate", str(small_consep), str(small_consep), "--json", str(blocker / "r.json")]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(f"medseg evaluate: error: {blocker}")


def test_argument_values_are_checked_by_the_parser(capsys):
    assert main(["predict", "x.png", "--out", "o", "--foreground-threshold", "1.5"]) == 2
    assert "argument --foreground-threshold: expected a number between 0 and 1 or 'argmax'; got '1.5'" in capsys.readouterr().err
    assert main(["tune-threshold", "m.safetensors", "data", "--out", "o.safetensors", "--groups", " , "]) == 2
    assert "argument --groups: names no source image" in capsys.readouterr().err


def test_options_not_given_keep_the_settings_defaults():
    from napari_medseg.cli import build_parser
    from napari_medseg.cli.settings import batch_settings_from, instance_settings_from
    from napari_medseg.inference import PostprocessSettings, TileSettings
    from napari_medseg.nuclei.watershed import InstanceSettings

    settings = batch_settings_from(build_parser().parse_args(["predict", "x.png", "--out", "o"]))
    assert settings.tiles == TileSettings() and settings.postprocess == PostprocessSettings()
    # no nucleus setting given: the model's own (Segmenter.instance_settings) for every file
    assert settings.nuclei and settings.instance_overrides == {} and settings.foreground_threshold is None
    given = batch_settings_from(build_parser().parse_args(
        ["predict", "x.png", "--out", "o", "--tile", "128", "--blend", "cosine", "--fill-holes", "7", "--min-size", "3",
         "--no-instances"]))
    assert (given.tiles.tile_size, given.tiles.overlap, given.tiles.blend) == (128, TileSettings().overlap, "cosine")
    assert given.postprocess == PostprocessSettings(max_hole_size=7) and not given.nuclei
    assert given.instance_overrides == {"min_size": 3}
    evaluate = build_parser().parse_args(["evaluate", "p", "g", "--min-size", "3"])
    assert instance_settings_from(evaluate) == InstanceSettings(min_size=3)


def test_predict_a_region_of_a_real_svs_slide(tmp_path, tiny_checkpoint, capsys):
    """`medseg predict SLIDE --region` writes the slide's results; without a region it says what to add."""
    slide = Path(__file__).resolve().parents[2] / "shared/data/slides/CMU-1-Small-Region.svs"
    out = tmp_path / "out"
    assert main(["predict", str(slide), "--out", str(out), "--model", str(tiny_checkpoint)]) == 2
    assert "--region" in capsys.readouterr().err and not out.exists()
    assert main(["predict", str(slide), "--region", "700,700,256,256", "--out", str(out),
                 "--model", str(tiny_checkpoint), "--backend", "torch"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"CMU-1-Small-Region_labels.ome.tif", "CMU-1-Small-Region_nuclei.geojson",
            "CMU-1-Small-Region_nuclei.csv"} <= names


def test_predict_runs_without_torch_once_its_runtime_was_checked(consep, tiny_checkpoint, tmp_path):
    """``medseg predict`` as a user runs it, twice: the first run checks the runtime (with torch)
    and records the choice; the second loads by the record, torch never imported, and writes the
    same class maps."""
    import shutil
    import subprocess
    import sys

    from napari_medseg.inference.backends import runtime_installed

    if not any(runtime_installed(r) for r in ("openvino", "onnxruntime")):
        pytest.skip("no ONNX runtime installed")
    checkpoint = shutil.copy(tiny_checkpoint, tmp_path / "tiny.safetensors")  # a checkpoint never checked
    image = consep / "images" / "train_5_000.png"
    script = ("import sys; from napari_medseg.cli import main; "
              "rc = main(sys.argv[1:]); print('torch loaded:', 'torch' in sys.modules); sys.exit(rc)")
    outs = []
    for run in ("first", "second"):
        out = tmp_path / run
        done = subprocess.run([sys.executable, "-c", script, "predict", str(image), "--model", str(checkpoint),
                               "--out", str(out), "--device", "cpu", "--tile", "128", "--overlap", "32"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        outs.append((done.stdout, read_label_map(out / "labels" / "train_5_000.tif")))
    assert "torch loaded: True" in outs[0][0] and "torch loaded: False" in outs[1][0]
    assert np.array_equal(outs[0][1], outs[1][1])


def test_an_interrupted_train_says_how_to_resume_and_that_command_finishes_it(small_consep, tmp_path, capsys,
                                                                                monkeypatch):
    """SIGTERM after epoch 1 of 3: the hint repeats every --set (without them the config differs,
    or the run goes on in the config's own folder), and following it ends the run in its folder."""
    import os
    import shlex
    import signal

    from napari_medseg.cli import train as cli_train
    from napari_medseg.training import EpochDone

    run = tmp_path / "run"
    config = str(Path(__file__).parents[1] / "configs" / "smoke.yaml")
    args = ["train", config, "--set", f"data.dataset=[{small_consep}]", "--set", f"out_dir={run}",
            "--set", "data.val_fraction=0.34", "--set", "epochs=3", "--set", "data.samples_per_epoch=32"]
    update = cli_train._TrainPrinter.update

    def terminate_after_epoch_one(self, u):
        update(self, u)
        if isinstance(u, EpochDone) and u.epoch == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(cli_train._TrainPrinter, "update", terminate_after_epoch_one)
    assert main(args) == 143
    err = capsys.readouterr().err
    hint = next(line for line in err.splitlines() if line.startswith("resume with: "))
    words = shlex.split(hint[len("resume with: "):])
    assert words[:3] == ["medseg", "train", config] and f"out_dir={run}" in words and "epochs=3" in words
    assert words[-2:] == ["--resume", str(run / "resume.safetensors")]
    monkeypatch.setattr(cli_train._TrainPrinter, "update", update)
    assert main(words[1:]) == 0
    out = capsys.readouterr().out
    assert "epoch 3/3" in out and (run / "best.safetensors").is_file()

    # --overwrite, stopped before its first epoch ends: the folder's resume file is the finished
    # run's, and the hint had pointed at it (following it failed: 'config differs')
    def terminate_at_once(self, u):
        update(self, u)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(cli_train._TrainPrinter, "update", terminate_at_once)
    assert main([*args, "--overwrite"]) == 143
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "resume with:" not in err


def test_resume_goes_on_in_the_resumed_runs_folder_and_refuses_repeats(small_consep, tmp_path, capsys):
    config = str(Path(__file__).parents[1] / "configs" / "smoke.yaml")
    base = ["train", config, "--set", f"data.dataset=[{small_consep}]", "--set", "data.val_fraction=0.34",
            "--set", "data.samples_per_epoch=32"]
    run = tmp_path / "run"
    assert main(base + ["--set", f"out_dir={run}"]) == 0
    capsys.readouterr()
    assert main(base + ["--set", f"out_dir={tmp_path / 'other'}", "--resume", str(run / "resume.safetensors")]) == 0
    captured = capsys.readouterr()
    assert f"continuing in {run}" in captured.err and not (tmp_path / "other").exists()
    assert f"the run in {run} had finished: nothing trained" in captured.out
    # resume: in the config (here by --set) is the same: it had been refused ('already holds a
    # trained model') with out_dir its folder, and gone on elsewhere without a word otherwise
    assert main(base + ["--set", f"out_dir={run}", "--set", f"resume={run / 'resume.safetensors'}"]) == 0
    assert "had finished: nothing trained" in capsys.readouterr().out
    assert main(base + ["--set", f"out_dir={tmp_path / 'other'}",
                        "--set", f"resume={run / 'resume.safetensors'}"]) == 0
    assert f"continuing in {run}" in capsys.readouterr().err and not (tmp_path / "other").exists()
    assert main(base + ["--resume", str(tmp_path / "missing.safetensors")]) == 2
    captured = capsys.readouterr()
    assert "missing.safetensors' does not exist" in captured.err and "continuing in" not in captured.err
    assert main(base + ["--set", "repeats=2", "--resume", str(run / "resume.safetensors")]) == 2
    assert "each seed is a run of its own" in capsys.readouterr().err


def test_evaluate_scores_a_multi_class_prediction_against_nucleus_only_truth(tiny_checkpoint, tmp_path, capsys):
    """MoNuSeg and TNBC name no nucleus classes: the prediction's classes are merged into 'nucleus'
    and it says so, as the viewer and the browser score it (the command had refused the pair)."""
    import shutil

    from conftest import DATA

    truth = tmp_path / "tnbc"
    for sub in ("images", "labels", "instances"):
        (truth / sub).mkdir(parents=True)
    for stem in sorted(p.stem for p in (DATA / "tnbc_train" / "images").glob("*.png"))[:2]:
        shutil.copy(DATA / "tnbc_train" / "images" / f"{stem}.png", truth / "images")
        for sub in ("labels", "instances"):
            shutil.copy(DATA / "tnbc_train" / sub / f"{stem}.tif", truth / sub)
    shutil.copy(DATA / "tnbc_train" / "classes.json", truth)
    pred = tmp_path / "pred"
    assert main(["predict", str(truth), "--model", str(tiny_checkpoint), "--out", str(pred), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(pred), str(truth), "--json", str(tmp_path / "r.json")]) == 0
    captured = capsys.readouterr()
    assert "were merged into 'nucleus'" in captured.err and "nucleus Dice" in captured.out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["classes_merged"] and list(report["per_class"]) == ["background", "nucleus"]


def test_evaluate_json_writes_undefined_scores_as_null(small_consep, tmp_path):
    """A class absent from both maps has no IoU (0 / 0): the JSON says null, which every JSON
    reader takes (NaN, Python's default, is not JSON)."""
    from napari_medseg.io.images import write_label_map

    for path in (small_consep / "labels").glob("*.tif"):
        labels = read_label_map(path)
        write_label_map(path, np.where(labels == 1, 3, labels).astype(np.uint8))  # no 'other' left
    report_path = tmp_path / "r.json"
    assert main(["evaluate", str(small_consep), str(small_consep), "--json", str(report_path)]) == 0

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    report = json.loads(report_path.read_text(), parse_constant=refuse)
    assert report["per_class"]["other"]["iou"] is None
    assert report["per_class"]["epithelial"]["iou"] == 1.0


def test_predicted_maps_record_what_they_are_and_their_pixel_size(small_consep, tmp_path):
    """A predicted class map and instance map name the model's classes and colours, the nuclei's
    classes and the pixel size used, so napari reopens them named, coloured and at scale."""
    from napari_medseg.io.images import read_label_record
    from napari_medseg.io.pixel_size import file_pixel_size_um

    image = small_consep / "images" / "train_1_005.png"
    assert main(["predict", str(image), "--out", str(tmp_path / "p"), "--pixel-size", "0.25"]) == 0  # the default
    classes = read_label_record(tmp_path / "p" / "labels" / "train_1_005.tif")
    assert classes["kind"] == "classes" and classes["classes"][3] == "epithelial" and len(classes["colors"]) == 5
    nuclei_path = tmp_path / "p" / "instances" / "train_1_005.tif"
    nuclei = read_label_record(nuclei_path)
    instances, labels = read_label_map(nuclei_path), read_label_map(tmp_path / "p" / "labels" / "train_1_005.tif")
    assert instances.max() > 10
    assert nuclei["kind"] == "instances" and len(nuclei["instance_classes"]) == instances.max() + 1
    for i in np.unique(instances)[1:4]:  # each nucleus's recorded class is its pixels' majority
        assert nuclei["instance_classes"][i] == np.bincount(labels[instances == i]).argmax()
    assert file_pixel_size_um(nuclei_path) == pytest.approx(0.25)


def test_a_slide_batch_goes_on_past_a_broken_slide_and_is_checked_before_work(tmp_path, tiny_checkpoint, capsys):
    """A corrupt slide in the middle is skipped, named, and the next one still runs (the batch had
    stopped there, and a rerun without it refused the first one's results); two slides sharing a
    name, a folder already holding one's results, and --probabilities are refused before any work."""
    import shutil

    real = Path(__file__).resolve().parents[2] / "shared/data/slides/CMU-1-Small-Region.svs"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = shutil.copy(real, tmp_path / "a" / "first.svs"), shutil.copy(real, tmp_path / "a" / "second.svs")
    broken = tmp_path / "a" / "broken.svs"
    broken.write_bytes(Path(real).read_bytes()[:5000])
    out = tmp_path / "out"
    common = ["--region", "700,700,128,128", "--model", str(tiny_checkpoint), "--backend", "torch"]
    assert main(["predict", str(first), str(broken), str(second), "--out", str(out), *common]) == 1
    err = capsys.readouterr().err
    assert "skipped" in err and "broken.svs" in err and "1 of 3 slides not segmented" in err
    assert {"first_labels.ome.tif", "second_labels.ome.tif"} <= {p.name for p in out.iterdir()}

    twin = shutil.copy(real, tmp_path / "b" / "first.svs")
    for args, words in (([first, twin, "--out", str(tmp_path / "o2")], "share the name 'first'"),
                        ([second, "--out", str(out)], "already holds results of 'second'"),
                        ([first, "--out", str(tmp_path / "o3"), "--probabilities"], "--probabilities is for images")):
        assert main(["predict", *map(str, args), *common]) == 2
        assert words in capsys.readouterr().err
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_no_skip_background_reaches_a_slides_glass(tmp_path, tiny_checkpoint, capsys):
    """--no-skip-background had been ignored for slides: glass (and faint tissue called glass) was
    never segmented; now every block of the region is."""
    slide = Path(__file__).resolve().parents[2] / "shared/data/slides/CMU-1-Small-Region.svs"
    common = ["--region", "2000,2800,200,150", "--model", str(tiny_checkpoint), "--backend", "torch"]
    assert main(["predict", str(slide), "--out", str(tmp_path / "a"), *common]) == 0
    assert "0% tissue" in capsys.readouterr().out  # glass: skipped
    assert main(["predict", str(slide), "--out", str(tmp_path / "b"), "--no-skip-background", *common]) == 0
    # said as what it is (it had claimed '100% tissue' of glass), and the glass was segmented
    assert "tissue not looked for (--no-skip-background: every block segmented)" in capsys.readouterr().out
    import zarr

    for folder, segmented in (("a", False), ("b", True)):
        store = zarr.open_group(str(tmp_path / folder / "CMU-1-Small-Region.zarr"), mode="r")
        assert np.asarray(store["classes/0"][2800:2950, 2000:2200]).any() == segmented


def test_an_averaged_result_names_the_start_it_was_averaged_with(tmp_path, tiny_checkpoint):
    """A fine-tune into its start's own folder averages with the start as it was (trainer); the
    summary line had named the folder's best.safetensors, by then the run's own best."""
    import dataclasses
    from types import SimpleNamespace

    from napari_medseg.cli.train import _result_words
    from napari_medseg.models import build_model, read_meta, save_checkpoint
    from napari_medseg.training.config import AVERAGED_NAME, TrainConfig

    start = tmp_path / "run" / "best.safetensors"
    config = TrainConfig(init_checkpoint=str(start), average_with_start=0.5, out_dir=str(tmp_path / "run"))
    averaged = tmp_path / "run" / AVERAGED_NAME
    meta = read_meta(tiny_checkpoint)
    recorded = f"{start} (as it was before this run replaced it)"
    averaged.parent.mkdir(parents=True)
    save_checkpoint(averaged, build_model(meta.model), dataclasses.replace(
        meta, training={"averaged": {"start": recorded, "tuned": str(start)}}))
    words = _result_words(config, SimpleNamespace(checkpoint=averaged, best_epoch=2))
    assert words == f"best epoch 2; checkpoint {averaged} (averaged with {recorded}, 0.5 on this run)"


def test_a_torchrun_runs_resume_hint_is_a_torchrun_command(tmp_path, monkeypatch, capsys):
    """Under torchrun the hint names torchrun with the run's number of processes: the trainer
    refuses to resume with another number, and 'medseg train' is one process."""
    import shlex
    from types import SimpleNamespace

    from napari_medseg.cli import train as cli_train

    resume = tmp_path / "resume.safetensors"
    resume.write_bytes(b"x")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    args = SimpleNamespace(config="c.yaml", set=["epochs=3"], started=0)
    stage = SimpleNamespace(config=SimpleNamespace(out_dir=str(tmp_path)), name=None)
    cli_train._print_resume_hint(args, stage)
    hint = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("resume with: "))
    words = shlex.split(hint[len("resume with: "):])
    assert words[:7] == ["torchrun", "--nproc_per_node", "2", "-m", "napari_medseg", "train", "c.yaml"]
    assert words[-2:] == ["--resume", str(resume)]
    monkeypatch.setenv("WORLD_SIZE", "1")
    cli_train._print_resume_hint(args, stage)
    assert "resume with: medseg train c.yaml" in capsys.readouterr().err


def test_an_epoch_line_of_nucleus_only_sets_leaves_out_the_class_figures_they_have_not():
    from napari_medseg.cli.train import _epoch_line
    from napari_medseg.training.events import EpochDone

    binary = {"miou": float("nan"), "mean_dice": float("nan"), "nucleus_dice": 0.81, "bpq": 0.52}
    line = _epoch_line("", EpochDone(2, 5, 0.3, 0.4, binary, True, 12.0, 1e-3))
    assert "nan" not in line and "val_nucleus_dice 0.8100" in line and "val_bPQ 0.5200" in line
    classed = _epoch_line("", EpochDone(2, 5, 0.3, 0.4, {**binary, "miou": 0.4, "mean_dice": 0.5}, False, 12.0))
    assert "val_mIoU 0.4000" in classed and "val_mean_class_dice 0.5000" in classed
    assert "least_gain" not in classed
    # monitor val_least_gain_over_start: the figure the best epoch is kept by, signed
    gained = _epoch_line("", EpochDone(2, 5, 0.3, 0.4, {**binary, "least_gain_over_start": -0.0042}, True, 12.0))
    assert "least_gain_over_start -0.0042" in gained


def test_a_folder_of_images_and_slides_says_the_slides_are_not_segmented_with_the_images(tmp_path, capsys):
    from napari_medseg.cli.predict import _collect_inputs

    folder = tmp_path / "mixed"
    folder.mkdir()
    patch = next((Path(__file__).resolve().parents[2] / "shared/data/consep_train/images").glob("*.png"))
    shutil.copy(patch, folder / patch.name)
    (folder / "a.svs").write_bytes(b"")  # named, never opened
    assert _collect_inputs([str(folder)]) == [folder / patch.name]
    err = capsys.readouterr().err
    assert "also holds 1 whole slide (a.svs), not segmented" in err and "--whole-slide" in err
    (folder / "a.svs").unlink()
    _collect_inputs([str(folder)])
    assert capsys.readouterr().err == ""


def test_an_interrupted_folder_run_says_which_results_are_whole(consep, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """Ctrl-C in a folder had printed 'interrupted' alone, with 15 of 60 results whole in OUT."""
    import napari_medseg.inference.batch as batch

    images = tmp_path / "images"
    images.mkdir()
    for stem in ("train_5_000", "train_19_005", "train_2_006"):
        shutil.copy(consep / "images" / f"{stem}.png", images)
    real = batch.predict_file

    def ctrl_c_on_the_third(segmenter, file, *args, **kwargs):
        if Path(file).name == "train_5_000.png":  # the third in name order
            raise KeyboardInterrupt
        return real(segmenter, file, *args, **kwargs)

    monkeypatch.setattr(batch, "predict_file", ctrl_c_on_the_third)
    out = tmp_path / "pred"
    assert main(["predict", str(images), "--model", str(tiny_checkpoint), "--out", str(out), "--device", "cpu"]) == 130
    err = capsys.readouterr().err
    assert f"interrupted at image 3 of 3 (train_5_000.png); the results of the 2 images before it are whole in {out}" in err
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["train_19_005.tif", "train_2_006.tif"]
