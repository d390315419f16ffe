"""The network's input enlarged over the model's pixel grid (``network_zoom``): recorded in a
checkpoint, overridden per run, refused out of range, shown by ``medseg info``, kept by a fine-tune."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from napari_medseg.inference import InferenceSettingsError, Segmenter, TileSettings
from napari_medseg.models import CheckpointError, load_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def zoomed_copy(tiny_checkpoint, out, zoom) -> str:
    model, meta = load_checkpoint(tiny_checkpoint)
    meta.network_zoom = zoom
    return str(save_checkpoint(out, model, meta))


def test_recorded_zoom_runs_the_network_on_an_enlarged_image(tiny_checkpoint, real_512, tmp_path):
    image = real_512[:200, :232]
    plain = Segmenter.load(tiny_checkpoint, device="cpu")
    zoomed = Segmenter.load(zoomed_copy(tiny_checkpoint, tmp_path / "z.safetensors", 1.5), device="cpu")
    tiles = TileSettings(64, 16, skip_background=False)

    at_one = plain.segment(image, tiles)
    probabilities = np.zeros((5, *image.shape[:2]), np.float32)
    enlarged = zoomed.segment(image, tiles, probabilities_out=probabilities)
    # the maps come back to the image's own grid; the network saw 1.5x the pixels: other maps
    assert enlarged.shape == at_one.shape == image.shape[:2]
    assert (enlarged != at_one).mean() > 0.01
    np.testing.assert_allclose(probabilities.sum(0), 1.0, atol=1e-3)
    assert zoomed.last_report.tiles > plain.last_report.tiles
    # how the model runs is no news about the image: no resampling note
    assert not any("resampled" in n for n in zoomed.last_report.notes)
    # zoom 1 asked for: exactly the plain run
    assert np.array_equal(zoomed.segment(image, TileSettings(64, 16, skip_background=False, network_zoom=1.0)),
                          at_one)
    # the zoom is relative to the model's grid: an image at twice the model's pixel size is
    # enlarged 2 x 1.5, and the note names only the pixel-size part
    plain_meta = Segmenter.load(zoomed_copy(tiny_checkpoint, tmp_path / "p.safetensors", 1.5), device="cpu")
    plain_meta.meta.pixel_size_um = 0.25
    plain_meta.segment(image, tiles, pixel_size_um=0.5)
    assert [n for n in plain_meta.last_report.notes if "resampled" in n] == [
        "resampled x2 to the model's pixel size (0.25 µm/px) and back"]


def test_nuclei_are_cut_on_the_models_grid(tiny_checkpoint, real_512, tmp_path):
    """Sizes in the nucleus settings stay model px: the zoom does not shrink the smallest nucleus."""
    from napari_medseg.nuclei.watershed import semantic_to_instances

    zoomed = Segmenter.load(zoomed_copy(tiny_checkpoint, tmp_path / "z.safetensors", 1.5), device="cpu")
    tiles, image = TileSettings(64, 16, skip_background=False), real_512[:256, :256]
    settings = zoomed.instance_settings_with({"min_size": 10})
    class_map, instances = zoomed.segment_nuclei(image, tiles, instance_settings=settings)
    assert instances.max() > 0
    assert np.array_equal(instances, semantic_to_instances(zoomed.segment(image, tiles), settings))


@pytest.mark.parametrize("zoom", [0.2, 3, float("nan"), "1.5", True])
def test_zoom_out_of_range_is_refused_by_name(zoom):
    with pytest.raises(InferenceSettingsError, match="Network zoom must be a number from 0.5 to 2"):
        TileSettings(network_zoom=zoom).checked()


def test_checkpoint_with_impossible_zoom_is_refused(tiny_checkpoint, tmp_path):
    model, meta = load_checkpoint(tiny_checkpoint)
    meta.network_zoom = 1.5
    path = save_checkpoint(tmp_path / "ok.safetensors", model, meta)
    assert load_checkpoint(path)[1].network_zoom == 1.5
    meta.network_zoom = 7.0
    with pytest.raises(CheckpointError, match="network_zoom must lie between 0.5 and 2.0, got 7.0"):
        meta.check("edited.safetensors")


def test_cli_info_says_the_zoom_and_predict_refuses_a_bad_one(tiny_checkpoint, consep, tmp_path):
    model = zoomed_copy(tiny_checkpoint, tmp_path / "z.safetensors", 1.35)
    info = subprocess.run([sys.executable, "-m", "napari_medseg", "info", model], capture_output=True, text=True)
    assert info.returncode == 0, info.stderr
    assert "\nzoom        x1.35: the network runs on the image enlarged that much" in info.stdout, info.stdout
    image = sorted((consep / "images").iterdir())[0]
    bad = subprocess.run([sys.executable, "-m", "napari_medseg", "predict", str(image), "--model", model,
                          "--network-zoom", "9", "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert bad.returncode != 0
    assert "Network zoom must be a number from 0.5 to 2, got 9.0" in bad.stderr
    assert "Traceback" not in bad.stderr, bad.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_fine_tune_from_a_zoomed_model_records_zoom_1(tiny_checkpoint, tmp_path):
    """Its validation, which picks its epoch, runs the network at 1: a zoom is measured anew
    for new weights; the start's other measured choices are kept."""
    from conftest import copy_small_tnbc
    from napari_medseg.models import read_meta
    from napari_medseg.training import load_train_config, train

    model, meta = load_checkpoint(tiny_checkpoint)
    meta.network_zoom, meta.instance_settings = 1.35, {"min_size": 30}
    start = save_checkpoint(tmp_path / "zoomed.safetensors", model, meta)
    data = copy_small_tnbc(tmp_path / "tnbc")
    cfg = load_train_config(None, ["data.crop_size=64", "data.val_fraction=0.34", "batch_size=2", "epochs=1",
                                   "num_threads=1", "save_resume=false", "tune_threshold=false",
                                   f"init_checkpoint={start}", f"out_dir={tmp_path / 'ft'}",
                                   f"data.datasets=[{{path: {data}, labels: binary}}]"])
    done = read_meta(train(cfg).checkpoint)
    assert done.network_zoom == 1.0
    assert done.instance_settings == {"min_size": 30}
