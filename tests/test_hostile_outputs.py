"""Hostile inputs against the output-folder policy (io.outputs): nothing a user has is lost or
overwritten, temp files go on every exit path, and a full disk is a message naming the file."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hostile import assert_refused, dataset, medseg, model, no_temp_files, tiny_dataset, tiny_model, tree  # noqa: F401 (fixtures)


def test_predict_into_its_own_dataset_is_refused_and_the_labels_are_kept(dataset, model):  # was LOSS
    before = tree(dataset)
    err = assert_refused(medseg("predict", dataset, "--model", model, "--out", dataset, process=True),
                         "is a dataset folder")
    assert "Choose an empty or new folder" in err
    assert tree(dataset) == before


def test_predict_into_a_folder_holding_an_input_is_refused(tmp_path, model, dataset):  # was LOSS
    out = tmp_path / "out"
    (out / "labels").mkdir(parents=True)
    shutil.copy(dataset / "images" / "a_0.png", out / "labels" / "a_0.png")
    before = tree(out)
    assert_refused(medseg("predict", out / "labels" / "a_0.png", "--model", model, "--out", out), "would overwrite the input")
    assert tree(out) == before


def test_a_file_where_a_result_folder_goes_is_refused_before_anything_is_written(tmp_path, dataset, model):  # was HALF-WRITTEN
    out = tmp_path / "out"
    out.mkdir()
    (out / "instances").write_text("x")  # a file of that name: the nuclei could not go in
    before = tree(out)
    assert_refused(medseg("predict", dataset / "images", "--model", model, "--out", out),
                   f"{out / 'instances'} is a file, where the results' folder goes")
    assert tree(out) == before  # not a class map without its nuclei, nor classes.json


def test_two_inputs_with_one_stem_are_refused_before_anything_is_written(tmp_path, dataset, model):  # was LOSS
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(dataset / "images" / "a_0.png", other / "a_0.png")
    out = tmp_path / "out"
    err = assert_refused(medseg("predict", dataset / "images" / "a_0.png", other / "a_0.png", "--model", model,
                                "--out", out), "share the name 'a_0'")
    assert "Rename one of them" in err and not out.exists()


def test_predict_counts_what_it_wrote(tmp_path, dataset, model):
    out = tmp_path / "out"
    proc = medseg("predict", dataset, "--model", model, "--out", out, "--no-instances")
    assert proc.returncode == 0, proc.stderr
    assert f"wrote 3 class maps to {out / 'labels'}" in proc.stdout
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["a_0.tif", "a_1.tif", "b_0.tif"]


@pytest.mark.parametrize("classes_json", [
    {"classes": ["background", "neoplastic", "inflammatory"]},  # another model's results
    ["background", "nucleus"],  # a list, not the {"classes": [...]} mapping
])
def test_predict_never_replaces_another_runs_classes(tmp_path, dataset, model, classes_json):  # was LOSS
    out = tmp_path / "out"
    (out / "labels").mkdir(parents=True)
    (out / "labels" / "old.tif").write_bytes(b"an earlier model's map")
    (out / "classes.json").write_text(json.dumps(classes_json))
    before = tree(out)
    assert_refused(medseg("predict", dataset, "--model", model, "--out", out), f"--out {out} holds results with")
    assert tree(out) == before


def test_convert_never_writes_pannuke_classes_over_another_dataset(tmp_path, dataset):  # was LOSS
    fold = tmp_path / "fold"
    fold.mkdir()
    np.save(fold / "images.npy", np.zeros((1, 8, 8, 3), np.float64))
    np.save(fold / "masks.npy", np.zeros((1, 8, 8, 6), np.float64))
    out = tmp_path / "converted"
    tiny_dataset(out)  # a dataset folder of other classes
    before = tree(out)
    assert_refused(medseg("convert", "pannuke", fold, out), f"out_dir {out} holds results with the classes")
    assert tree(out) == before


def _config(tmp_path, dataset, out_dir):
    path = tmp_path / "train.yaml"
    path.write_text(f"data: {{dataset: [{dataset}], crop_size: 16}}\nout_dir: {out_dir}\nepochs: 1\n"
                    "model: {architecture: vanilla_unet, base_channels: 4, depth: 2}\n")
    return path


def test_train_into_a_finished_run_is_refused_and_says_how_to_overwrite(tmp_path, dataset, model):  # was LOSS
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(model, run / "best.safetensors")
    before = tree(run)
    err = assert_refused(medseg("train", _config(tmp_path, dataset, run)), "already holds a trained model",
                         "--overwrite", "--resume")
    assert str(run / "best.safetensors") in err
    assert tree(run) == before


def test_train_overwrite_leaves_no_earlier_run_file_beside_the_new_one(tmp_path, dataset, model):  # was WRONG RESULT
    # an earlier run averaged with its start and repeated with two seeds; the new one does neither:
    # its folder must not keep averaged.safetensors or seed_1/ as if this run had written them
    run = tmp_path / "run"
    (run / "seed_1").mkdir(parents=True)
    for path in (run / "best.safetensors", run / "averaged.safetensors", run / "seed_1" / "best.safetensors"):
        shutil.copy(model, path)
    (run / "repeats.json").write_text("{}")
    (run / "notes.txt").write_text("mine")  # a user's own file is never touched
    proc = medseg("train", _config(tmp_path, dataset, run), "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert f"removed {run / 'averaged.safetensors'}" in proc.stderr
    assert sorted(p.name for p in run.iterdir()) == ["best.safetensors", "notes.txt", "resume.safetensors"]
    assert (run / "best.safetensors").read_bytes() != Path(model).read_bytes()  # the new run's


def test_tune_threshold_never_writes_over_its_input_or_an_existing_file(tmp_path, dataset, model):  # was LOSS
    copy = shutil.copy(model, tmp_path / "m.safetensors")
    before = tree(tmp_path / "m.safetensors")
    assert_refused(medseg("tune-threshold", copy, dataset, "--all-images", "--out", copy), "is the input checkpoint")
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"someone's file")
    assert_refused(medseg("tune-threshold", copy, dataset, "--all-images", "--out", other), "exists", "--overwrite")
    assert other.read_bytes() == b"someone's file" and tree(tmp_path / "m.safetensors") == before


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_a_killed_runs_temp_files_are_removed_by_the_next_run_and_only_those(tmp_path, dataset, model):
    out = tmp_path / "out"
    (out / "labels").mkdir(parents=True)
    (out / "probabilities").mkdir()
    (out / "classes.json").write_text(json.dumps({"classes": ["background", "nucleus"]}))  # the killed run's
    dead, alive = _dead_pid(), os.getpid()
    stale = [out / "labels" / f".a_0.tif.{dead}.0123456789ab.part",
             out / "probabilities" / f".a_0.npy.{dead}.0123456789ab.part"]
    kept = [out / "labels" / f".a_1.tif.{alive}.0123456789ab.part",  # a live process's: not ours to remove
            out / "labels" / ".notes.part", out / "labels" / "mine.part"]  # not our pattern
    for path in stale + kept:
        path.write_bytes(b"x" * 100)
    proc = medseg("predict", dataset, "--model", model, "--out", out, "--no-instances", "--probabilities")
    assert proc.returncode == 0, proc.stderr
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def test_train_removes_the_temp_files_a_killed_train_left(tmp_path, dataset, monkeypatch):
    from napari_medseg.training.checkpoints import check_output_dir

    run = tmp_path / "run"
    run.mkdir()
    stale = run / f".best.safetensors.{_dead_pid()}.0123456789ab.part"
    stale.write_bytes(b"x" * 1000)
    check_output_dir(run)  # what every training run does first
    assert not stale.exists() and os.listdir(run) == []


def test_a_killed_slide_runs_temp_store_folder_is_removed_and_nothing_else(tmp_path):
    from napari_medseg.io.outputs import remove_stale_temps

    out = tmp_path / "out"
    stale = out / f".slide.zarr.{_dead_pid()}.0123456789ab.part"
    (stale / "classes" / "0").mkdir(parents=True)
    (stale / "classes" / "0" / "c0").write_bytes(b"x" * 100)
    live = out / f".other.zarr.{os.getpid()}.0123456789ab.part"
    live.mkdir()
    (out / "slide.zarr").mkdir()  # a finished store: not a temp
    assert remove_stale_temps(out) == [stale]
    assert not stale.exists() and live.is_dir() and (out / "slide.zarr").is_dir()


def test_another_machines_temp_files_are_never_removed(tmp_path):  # was LOSS: a shared folder's live job
    from napari_medseg.io.outputs import _host_tag, remove_stale_temps, temp_path

    out = tmp_path / "out"
    out.mkdir()
    dead = _dead_pid()
    mine = temp_path(out / "a.zarr")
    assert mine.name.startswith(f".a.zarr.{_host_tag()}-{os.getpid()}.")
    stale_here = out / f".b.zarr.{_host_tag()}-{dead}.0123456789ab.part"
    elsewhere = out / f".c.zarr.node17-{dead}.0123456789ab.part"  # the same pid means nothing there
    for path in (mine, stale_here, elsewhere):
        path.mkdir()
    assert remove_stale_temps(out) == [stale_here]
    assert mine.is_dir() and elsewhere.is_dir()


def _engine_that(monkeypatch, action):
    from napari_medseg.inference import Segmenter

    def run(self, *args, **kwargs):
        action()
        yield

    monkeypatch.setattr(Segmenter, "iter_segment", run)


def test_sigterm_ends_predict_cleanly_with_no_partial_file(tmp_path, dataset, model, monkeypatch, capsys):
    from napari_medseg.cli import main

    _engine_that(monkeypatch, lambda: os.kill(os.getpid(), signal.SIGTERM))
    out = tmp_path / "out"
    assert main(["predict", str(dataset / "images" / "a_0.png"), "--model", str(model), "--out", str(out),
                 "--probabilities"]) == 143
    assert capsys.readouterr().err.strip().endswith("medseg predict: terminated")
    # nothing half-made: no temp file, nor the folder made for it (it had stayed, empty)
    assert no_temp_files(out) == [] and not (out / "probabilities").exists()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # main hands the signal back


def test_a_real_sigterm_mid_run_leaves_no_temp_file(tmp_path, model):
    from PIL import Image

    image = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1536, 1536, 3), np.uint8)).save(image)
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "napari_medseg", "predict", str(image), "--model", str(model),
                             "--out", str(out), "--probabilities", "--tile", "64", "--overlap", "0"],
                            env=env, stderr=subprocess.PIPE, text=True)
    for _ in range(600):  # wait until the probability file exists: the run is under way
        if no_temp_files(out):
            break
        if proc.poll() is not None:
            pytest.skip("the run ended before it could be interrupted")
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert no_temp_files(out) == []


def test_a_full_disk_under_probabilities_is_a_message_naming_the_file(tmp_path, dataset, model, monkeypatch, capsys):
    # was CRASH: the memory map met the full disk while writing, and the process died of SIGBUS
    from napari_medseg.cli import main

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    out = tmp_path / "out"
    assert main(["predict", str(dataset / "images" / "a_0.png"), "--model", str(model), "--out", str(out),
                 "--probabilities"]) == 2
    err = capsys.readouterr().err
    assert f"Cannot write {out / 'probabilities' / 'a_0.npy'}: No space left on device" in err
    assert ".part" not in err and no_temp_files(out) == []
    assert not out.exists()  # nor the folders made for it (an empty probabilities/ had been left)


def test_a_full_disk_under_a_checkpoint_write_names_the_checkpoint(tmp_path, dataset, model, monkeypatch, capsys):
    # was traceback: a raw SafetensorError about the hidden temp file
    import safetensors.torch
    from safetensors import SafetensorError

    from napari_medseg.cli import main

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                              "message: \"No space left on device\" })")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "tuned" / "t.safetensors"
    assert main(["tune-threshold", str(model), str(dataset), "--all-images", "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"Cannot write {out}: No space left on device" in err and "SafetensorError" not in err
    assert not out.exists() and no_temp_files(tmp_path) == []


def test_an_output_folder_that_is_a_file_is_refused(tmp_path, dataset, model):
    out = tmp_path / "results"
    out.write_text("a user's notes")
    assert_refused(medseg("predict", dataset, "--model", model, "--out", out), "is a file, not a folder")
    assert out.read_text() == "a user's notes"
