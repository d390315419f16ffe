"""Hostile checkpoints: edited metadata, NaN weights, folders and resume files given as models.
Each is refused where it is loaded, by a message naming the file and the key, and nothing is
written (no prediction folder, no "tuned" copy)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hostile import assert_refused, dataset, medseg, model, rewrite_checkpoint, tiny_dataset, tiny_model, tree  # noqa: F401 (fixtures)


def _set(key, value):
    def change(meta):
        node = meta
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return change


@pytest.mark.parametrize("key, value, fragment", [
    ("foreground_threshold", "0.4", "foreground_threshold must be a number"),  # was traceback (numpy ufunc)
    ("foreground_threshold", 1.5, "foreground_threshold must lie strictly between 0 and 1"),
    ("normalization", {"mean": [0.5, 0.5, 0.5], "std": [0, 0, 0]}, "normalization std must be above 0"),  # was silent
    ("normalization", {"mean": [0.5, 0.5, 0.5], "std": ["a", 1, 1]}, "normalization must be {mean: [...], std: [...]}"),
    ("classes", [0, 1], "classes must be a list of texts"),
    ("classes", "background,nucleus", "classes must be a list of texts"),
    ("pixel_size_um", -0.25, "pixel_size_um must be above 0"),
    ("model.encoder_depth", "three", "model.encoder_depth must be an integer"),
    ("model.num_classes", 2.0, "model.num_classes must be an integer"),
])
def test_edited_metadata_is_refused_naming_the_key(tmp_path, dataset, model, key, value, fragment):
    bad = rewrite_checkpoint(model, tmp_path / "edited.safetensors", meta_change=_set(key, value))
    assert_refused(medseg("info", bad), bad.name, fragment)
    out = tmp_path / "out"
    assert_refused(medseg("predict", dataset, "--model", bad, "--out", out), bad.name)
    assert not out.exists()


def test_nan_weights_are_refused_and_never_tuned(tmp_path, dataset, model):  # was silent: all-background output
    def poison(tensors):
        name = next(k for k, t in tensors.items() if t.is_floating_point())
        tensors[name] = torch.full_like(tensors[name], math.nan)

    bad = rewrite_checkpoint(model, tmp_path / "diverged.safetensors", tensor_change=poison)
    out = tmp_path / "out"
    assert_refused(medseg("predict", dataset, "--model", bad, "--out", out), "diverged.safetensors", "NaN")
    tuned = tmp_path / "tuned.safetensors"
    assert_refused(medseg("tune-threshold", bad, dataset, "--all-images", "--out", tuned), "NaN")
    assert not out.exists() and not tuned.exists()


def test_a_folder_given_as_checkpoint_is_called_a_folder(tmp_path, model, dataset):  # was vague: "does not exist"
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.safetensors").write_bytes(model.read_bytes())
    err = assert_refused(medseg("predict", dataset, "--model", run, "--out", tmp_path / "out"), "is a folder")
    assert str(run / "best.safetensors") in err


def test_a_resume_file_given_as_checkpoint_is_called_a_resume_file(tmp_path, model, dataset):  # was "bare weights"
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(model), framework="pt") as fh:
        header = fh.metadata()
    resume = tmp_path / "resume.safetensors"
    save_file({f"model.{k}": v for k, v in load_file(str(model)).items()}, str(resume),
              metadata={"napari_medseg_resume": json.dumps({"epoch": 1}), "unused": header["napari_medseg"][:10]})
    assert_refused(medseg("info", resume), "is a resume file", "medseg train --resume", "best.safetensors")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"\x80\x04\x95 pickled"])
def test_garbage_checkpoints_are_refused_and_nothing_is_written(tmp_path, dataset, content):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    before = tree(dataset)
    assert_refused(medseg("predict", dataset, "--model", bad, "--out", tmp_path / "out"), "bad.safetensors")
    assert tree(dataset) == before and not (tmp_path / "out").exists()
