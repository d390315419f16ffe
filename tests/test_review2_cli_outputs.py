"""What ``medseg predict`` leaves in its output folder when a write fails, and what it records there."""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest

from hostile import assert_refused, medseg, no_temp_files

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_probability_file_that_cannot_be_reserved_leaves_no_folder(tmp_path, tiny_checkpoint, consep, monkeypatch):
    """A full disk at ``--probabilities``' reservation: the message names the file, and neither
    OUT/probabilities/ nor OUT (made for it) is left behind, empty (they had been)."""
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    out = tmp_path / "new" / "out"
    proc = medseg("predict", consep / "images" / "train_2_006.png", "--model", tiny_checkpoint, "--out", out,
                  "--device", "cpu", "--tile", "128", "--overlap", "32", "--probabilities")
    assert_refused(proc, f"Cannot write {out / 'probabilities' / 'train_2_006.npy'}: No space left on device")
    assert not (tmp_path / "new").exists(), sorted(tmp_path.rglob("*"))


def test_a_failed_reservation_in_a_folder_with_results_keeps_them(tmp_path, tiny_checkpoint, consep, monkeypatch):
    """The same failure where an earlier run wrote results: they stay, and only the empty folder
    this run made goes."""
    image = consep / "images" / "train_2_006.png"
    out = tmp_path / "out"
    args = ("predict", image, "--model", tiny_checkpoint, "--out", out, "--device", "cpu", "--tile", "128",
            "--overlap", "32")
    assert medseg(*args).returncode == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    assert_refused(medseg(*args, "--probabilities"), "No space left on device")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before and no_temp_files(out) == []


def test_classes_json_names_the_run_that_last_wrote_into_the_folder(tmp_path, tiny_checkpoint, consep):
    """A second model (same classes) predicting into the folder: classes.json's source names it (it
    kept the first run's, so the folder claimed results the second model made were the first's)."""
    import shutil

    other = tmp_path / "other.safetensors"
    shutil.copy(tiny_checkpoint, other)
    out = tmp_path / "out"
    common = ("--out", out, "--device", "cpu", "--tile", "128", "--overlap", "32")
    assert medseg("predict", consep / "images" / "train_2_006.png", "--model", tiny_checkpoint, *common).returncode == 0
    assert str(tiny_checkpoint) in json.loads((out / "classes.json").read_text())["source"]
    assert medseg("predict", consep / "images" / "train_2_006.png", "--model", other, *common).returncode == 0
    record = json.loads((out / "classes.json").read_text())
    assert str(other) in record["source"] and record["classes"][0] == "background"
    # an unreadable file alone changes nothing there
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    before = (out / "classes.json").read_text()
    assert medseg("predict", text, "--model", tiny_checkpoint, *common).returncode == 1
    assert (out / "classes.json").read_text() == before


def test_the_runtimes_note_is_said_once_a_run_not_under_every_file(tmp_path, tiny_checkpoint, consep):
    """How the runtime was chosen is the run's, not an image's: said once (it had been repeated
    under each file), while each file's own notes stay under its name."""
    from PIL import Image

    images = [consep / "images" / f"train_2_00{i}.png" for i in (5, 6)]
    gray = tmp_path / "gray.png"
    Image.open(images[0]).convert("L").save(gray)
    proc = medseg("predict", *images, gray, "--model", tiny_checkpoint, "--out", tmp_path / "out", "--device", "cpu",
                  "--tile", "128", "--overlap", "32", "--backend", "torch", "--precision", "int8")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("int8 needs an ONNX runtime") == 1, proc.stderr
    assert "medseg: runtime: int8 needs an ONNX runtime: float32 PyTorch" in proc.stderr
    assert any(line.startswith("  gray.png: ") and "gray" in line for line in proc.stderr.splitlines()), proc.stderr


def test_a_rerun_replaces_its_images_results_whole_and_names_what_else_is_there(tmp_path, tiny_checkpoint, consep):
    """Two images with probabilities, then one of them again without: its results are this run's
    alone (the old nuclei and probabilities removed, named), the other image's stay as they were
    (never removed: not given) and are named, since ``medseg evaluate OUT`` would score them too."""
    import hashlib

    a, b = (consep / "images" / f"train_2_00{i}.png" for i in (5, 6))
    out = tmp_path / "out"
    common = ("--model", tiny_checkpoint, "--out", out, "--device", "cpu", "--tile", "128", "--overlap", "32")
    assert medseg("predict", a, b, "--probabilities", *common).returncode == 0
    others = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("train_2_006*")}
    assert len(others) == 5  # class map, nuclei, probabilities, the nuclei's table and outlines
    proc = medseg("predict", a, "--no-instances", *common)
    assert proc.returncode == 0, proc.stderr
    assert "removed instances/train_2_005.tif" in proc.stderr and "removed probabilities/train_2_005.npy" in proc.stderr
    assert "removed nuclei/train_2_005.csv" in proc.stderr and "removed nuclei/train_2_005.geojson" in proc.stderr
    assert sorted(p.name for p in out.rglob("train_2_005*")) == ["train_2_005.tif"]
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("train_2_006*")} == others
    assert "also holds earlier runs' results of 1 other image (train_2_006.tif)" in proc.stderr
    alone = medseg("predict", a, *common)
    assert alone.returncode == 0 and "also holds" in alone.stderr
    fresh = medseg("predict", a, b, "--model", tiny_checkpoint, "--out", tmp_path / "fresh", "--device", "cpu",
                   "--tile", "128", "--overlap", "32")
    assert fresh.returncode == 0 and "also holds" not in fresh.stderr
