"""File > Open Sample > napari-medseg opens the 40x samples in µm, and Segment uses that size."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medseg._napari.sample_data import SAMPLE_PIXEL_SIZE_UM, sample_path


@pytest.fixture(scope="module")
def half_micron_checkpoint(tmp_path_factory):
    """An untrained tiny U-Net for CoNSeP's classes that records 0.5 µm/px (a 20x model)."""
    import torch

    from napari_medseg.models import CheckpointMeta, ModelConfig, build_model, save_checkpoint

    torch.manual_seed(0)
    cfg = ModelConfig("unet", "resnet18", num_classes=5, encoder_depth=3)
    meta = CheckpointMeta(model=cfg, classes=["background", "other", "inflammatory", "epithelial", "spindle"],
                          pixel_size_um=0.5)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny20x.safetensors", build_model(cfg).eval(), meta)


def test_the_sample_readme_states_the_pixel_size():
    text = sample_path("README.md").read_text()
    assert SAMPLE_PIXEL_SIZE_UM == 0.25 and "0.25 µm/px" in text


@pytest.mark.parametrize("key", ["consep", "monuseg"])
def test_the_samples_open_in_micrometres(make_napari_viewer, key):
    viewer = make_napari_viewer()
    layers = viewer.open_sample("napari-medseg", key)
    assert len(layers) == 3
    for layer in layers:  # were scale 1 in pixels: the scale bar read px, Objects' areas px
        assert tuple(layer.scale) == (0.25, 0.25), layer.name
        assert [str(u) for u in layer.units] == ["micrometer", "micrometer"], layer.name
    assert layers[0].metadata["pixel_size_um"] == 0.25
    assert viewer.layers[0].extent.world[1][-1] == pytest.approx(0.25 * layers[0].data.shape[1] - 0.125, abs=0.2)


def test_segment_sees_the_sample_at_its_pixel_size(make_napari_viewer, half_micron_checkpoint):
    import torch

    from napari_medseg._napari.segment_widget import FILE_MODEL
    from napari_medseg.inference import Segmenter

    torch.set_num_threads(1)
    viewer = make_napari_viewer()
    image = viewer.open_sample("napari-medseg", "consep")[0]
    _, widget = viewer.window.add_plugin_dock_widget("napari-medseg", "Segment")
    widget.image_layer.value = image
    widget.model_source.value = FILE_MODEL
    widget.checkpoint.value = half_micron_checkpoint
    widget.device.value, widget.backend.value, widget.nuclei.value = "cpu", "torch", False
    result = widget.run(threaded=False)
    assert result is not None, widget.status.value
    assert result.data.shape == image.data.shape[:2]
    assert tuple(result.scale) == (0.25, 0.25) and str(result.units[-1]) == "micrometer"  # on the sample
    segmenter = Segmenter.load(half_micron_checkpoint, device="cpu")
    at_its_size = segmenter.segment(np.asarray(image.data), widget.tile_settings(), pixel_size_um=0.25)
    as_model_pixels = segmenter.segment(np.asarray(image.data), widget.tile_settings())
    assert not np.array_equal(at_its_size, as_model_pixels)  # the pixel size makes a difference here
    np.testing.assert_array_equal(result.data, at_its_size)  # was the model-pixel result: no size known
