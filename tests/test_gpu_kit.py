"""scripts/gpu_kit.py: one stage packed for a lent GPU machine, whose tree travels without
../shared. Checked here on real CoNSeP patches: the packed folder trains and splits as the
original does, its images are JPEG within a few grey levels, its labels are the same bytes."""

from __future__ import annotations

import importlib.util
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import yaml

from napari_medseg.io import read_image
from napari_medseg.training.stages import load_train_stages, train_stages

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_kit():
    spec = importlib.util.spec_from_file_location("gpu_kit", REPO / "scripts" / "gpu_kit.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def wheels(tmp_path) -> Path:
    """A stand-in for the segmentation-models-pytorch wheel (no download in tests)."""
    folder = tmp_path / "wheels_here"
    folder.mkdir()
    version = metadata.version("segmentation-models-pytorch")
    (folder / f"segmentation_models_pytorch-{version}-py3-none-any.whl").write_bytes(b"wheel")
    return folder


def _config(tmp_path, small_consep, **extra) -> Path:
    config = tmp_path / "stages.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"architecture": "unet", "encoder": "resnet18", "encoder_depth": 3, "num_classes": 5},
        "data": {"datasets": [{"path": str(small_consep), "labels": "classes"}], "crop_size": 64,
                 "val_fraction": 0.34}, "batch_size": 4, "epochs": 1, "num_threads": 1, "out_dir": "runs/x",
        "on_cuda": {"batch_size": 64}, **extra, "stages": [{"name": "first"}, {"name": "second", "lr": 0.0001}]}))
    return config


@pytest.mark.usefixtures("one_torch_thread")
def test_a_packed_stage_reads_splits_and_trains_as_the_original(gpu_kit, small_consep, tmp_path, wheels,
                                                                tiny_checkpoint, monkeypatch):
    config = _config(tmp_path, small_consep, init_checkpoint=str(tiny_checkpoint))
    kit = gpu_kit.pack(config, None, [], 5, tmp_path / "kit", wheels)
    folder = tmp_path / "kit"
    packed = folder / "data" / small_consep.name
    originals = sorted((small_consep / "images").glob("*.png"))
    assert sorted(p.stem for p in (packed / "images").glob("*.jpg")) == [p.stem for p in originals]
    for original in originals:
        before = read_image(original).astype(int)
        after = read_image(packed / "images" / f"{original.stem}.jpg").astype(int)
        assert after.shape == before.shape and np.abs(after - before).mean() < 2
    for sub in ("labels", "instances"):
        for f in (small_consep / sub).iterdir():
            assert (packed / sub / f.name).read_bytes() == f.read_bytes()
    assert kit["sets"][0]["images"] == len(originals) and kit["sets"][0]["packed_bytes"] < kit["sets"][0]["png_bytes"]
    assert kit["bytes"] + kit["tree_bytes"] <= gpu_kit.LIMIT_BYTES
    # a start outside the tree travels in the kit; the shipped default would be read from the tree
    run_yaml = yaml.safe_load((folder / "run.yaml").read_text())
    start = Path(run_yaml["init_checkpoint"])
    assert start.parent == folder / "start" and start.read_bytes() == tiny_checkpoint.read_bytes()
    assert run_yaml["on_cuda"] == {"batch_size": 64} and run_yaml["out_dir"] == "runs/gpu/first"
    script = (folder / "run.sh").read_text()
    assert "--time-limit 5" in script and "runs/gpu/first/$f" in script
    assert "pip install" in script and "--no-index" in script  # nothing is fetched there
    import subprocess

    assert subprocess.run(["bash", "-n", str(folder / "run.sh")]).returncode == 0  # it parses
    # the packed stage trains, on the same split as the original folder
    monkeypatch.chdir(tmp_path)
    original_run = train_stages(load_train_stages(config, [f"out_dir={tmp_path / 'original'}"], "first"))
    packed_run = train_stages(load_train_stages(folder / "run.yaml"))
    assert packed_run.checkpoint.is_file()
    from napari_medseg.models import read_meta

    def held_out(checkpoint):
        return read_meta(checkpoint).data["val_groups"]

    assert held_out(packed_run.checkpoint) == held_out(original_run.checkpoint)
    said = gpu_kit.describe(kit)
    assert '"carry": [' in said and '"timeout_s": 420' in said


def test_the_shipped_model_is_read_from_the_tree_and_a_kit_that_would_not_fit_is_refused(gpu_kit, small_consep,
                                                                                           tmp_path, wheels):
    config = _config(tmp_path, small_consep, init_checkpoint="default", compare_with="default",
                     monitor="val_least_gain_over_start")
    gpu_kit.pack(config, None, [], 5, tmp_path / "kit", wheels)
    run_yaml = yaml.safe_load((tmp_path / "kit" / "run.yaml").read_text())
    shipped = "src/napari_medseg/models/default/default.safetensors"  # tracked: it travels with the tree
    assert run_yaml["init_checkpoint"] == run_yaml["compare_with"] == shipped
    assert not (tmp_path / "kit" / "start").exists()
    config = _config(tmp_path, small_consep)
    with pytest.raises(SystemExit, match="give at most 8 minutes"):
        gpu_kit.pack(config, None, [], 9, tmp_path / "kit", wheels)
    with pytest.raises(SystemExit, match="does not exist: pack a stage whose start is a file"):
        gpu_kit.pack(config, "second", [], 5, tmp_path / "kit", wheels)  # first's result is not made yet
    assert not (tmp_path / "kit.partial").exists()
    assert yaml.safe_load((tmp_path / "kit" / "run.yaml").read_text())["compare_with"] == shipped  # the last kit stays
