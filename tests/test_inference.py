"""Tiled inference: shapes, pixel types, seams, progress, cancelling, settings and eval mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from napari_medseg.steps import Cancelled
from napari_medseg.io.images import ImageReadError
from napari_medseg.inference import InferenceSettingsError, Segmenter, TileSettings, segment_file
from napari_medseg.inference.windows import gaussian_weights, tile_starts
from napari_medseg.models import CheckpointMeta, ModelConfig, build_model

CLASSES = ["background", "other", "inflammatory", "epithelial", "spindle"]
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def real_rgb(consep) -> np.ndarray:
    from napari_medseg.io import read_image

    return read_image(consep / "images" / "train_1_005.png")


def custom_segmenter(architecture: str = "attention_res_unet", in_channels: int = 3, seed: int = 0) -> Segmenter:
    torch.manual_seed(seed)
    cfg = ModelConfig(architecture, num_classes=len(CLASSES), in_channels=in_channels, base_channels=8, depth=3)
    return Segmenter(build_model(cfg).eval(), CheckpointMeta(model=cfg, classes=list(CLASSES)), CPU)


def balance_classes(seg: Segmenter, image: np.ndarray) -> None:
    """Shift the head's biases so each class wins somewhere: an untrained model otherwise
    predicts one class almost everywhere, and a seam test on a constant map proves nothing."""
    head = [m for m in seg.model.modules() if isinstance(m, nn.Conv2d) and m.out_channels == len(CLASSES)][-1]
    with torch.no_grad():
        x = torch.from_numpy(seg.normalise(image)).permute(2, 0, 1)[None]
        head.bias -= seg.model.eval()(x)[0].flatten(1).median(1).values


# --------------------------------------------------------------------------- shapes and pixel types


@pytest.mark.parametrize("shape", [(37, 300), (1, 1), (300, 37), (64, 64), (129, 67)])
def test_any_size_gives_a_class_map_of_that_size(segmenter, real_rgb, shape):
    h, w = shape
    image = np.resize(real_rgb, (h, w, 3))
    settings = TileSettings(64, 16, 8)
    labels = segmenter.segment(image, settings)
    assert labels.shape == (h, w) and labels.dtype == np.uint8
    assert labels.max() < len(CLASSES)
    probs = segmenter.probabilities(image, settings)
    assert probs.shape == (len(CLASSES), h, w) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    assert np.array_equal(probs.argmax(0), labels)


@pytest.mark.parametrize("shape", [(1, 1), (37, 300)])
def test_default_settings_pad_small_images_to_a_tile(segmenter, real_rgb, shape):
    labels = segmenter.segment(np.resize(real_rgb, (*shape, 3)))  # 256 tiles: padded up to one tile
    assert labels.shape == shape and labels.dtype == np.uint8


def test_gray_and_16_bit_inputs_are_accepted(segmenter, real_rgb):
    settings = TileSettings(64, 16, 8)
    real_rgb = real_rgb[:80, :100]
    gray = real_rgb.mean(-1).astype(np.uint8)
    out = segmenter.segment(gray, settings)
    assert out.shape == gray.shape and out.dtype == np.uint8
    # Gray is replicated to RGB, so it is the same as an RGB image with equal channels.
    assert np.array_equal(out, segmenter.segment(np.repeat(gray[..., None], 3, -1), settings))

    rgb16 = real_rgb.astype(np.uint16) * 257 + 3
    gray16 = gray.astype(np.uint16) * 16  # 12-bit range in a 16-bit container
    for image in (rgb16, gray16, real_rgb.astype(np.float32) / 255, np.moveaxis(real_rgb, -1, 0)):
        out = segmenter.segment(image, settings)
        assert out.shape == (80, 100) and out.dtype == np.uint8 and out.max() < len(CLASSES)


def test_one_channel_model_accepts_rgb_and_gray(real_rgb):
    seg = custom_segmenter("vanilla_unet", in_channels=1)
    rgb = real_rgb[:70, :90]
    gray = rgb.mean(-1).astype(np.uint8)
    assert seg.segment(gray, TileSettings(64, 16)).shape == gray.shape
    assert seg.segment(rgb, TileSettings(64, 16)).shape == gray.shape


def test_segment_file_reads_a_real_image(segmenter, consep):
    out = segment_file(consep / "images" / "train_2_006.png", segmenter, TileSettings(128, 32))
    assert out.shape == (256, 256) and out.dtype == np.uint8


# --------------------------------------------------------------------------- seams


class PixelwiseNet(nn.Module):
    """A 1x1-conv net: each output pixel sees only its own input pixel, so tiling must not change
    anything at all. Any error in tile placement, padding or weight normalisation shows."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Sequential(nn.Conv2d(3, 16, 1), nn.Tanh(), nn.Conv2d(16, len(CLASSES), 1))
        with torch.no_grad():
            self.conv[2].weight *= 4  # confident enough that argmax is not a coin toss

    def forward(self, x):
        return self.conv(x)


def plain(tile: int, overlap: int, batch: int = 4) -> TileSettings:
    """Tiling only: no glass skipping (a 64² tile of white lumen would otherwise be skipped,
    and the whole-image pass it is compared with never skips)."""
    return TileSettings(tile, overlap, batch, skip_background=False)


@pytest.mark.parametrize("settings", [plain(64, 16, 4), plain(128, 64, 8), plain(96, 40, 1)])
def test_tiling_is_exact_for_a_pixelwise_model(real_512, settings):
    cfg = ModelConfig("vanilla_unet", num_classes=len(CLASSES), depth=3)  # output stride 8
    seg = Segmenter(PixelwiseNet().eval(), CheckpointMeta(model=cfg, classes=list(CLASSES)), CPU)
    image = real_512[:301, :467]  # sides that are multiples of nothing
    balance_classes(seg, image)
    whole = seg.probabilities(image, plain(512, 0, 1))
    tiled = seg.probabilities(image, settings)
    np.testing.assert_allclose(tiled, whole, atol=2e-6)
    assert len(np.unique(whole.argmax(0))) >= 3  # the model really varies over the image


def test_seam_free_against_one_whole_image_pass_balanced(real_512):
    seg = custom_segmenter("vanilla_unet")
    balance_classes(seg, real_512)
    whole = seg.probabilities(real_512, plain(512, 0, 1))
    tiled = seg.probabilities(real_512, plain(128, 64, 8))
    shares = np.bincount(whole.argmax(0).ravel(), minlength=len(CLASSES)) / whole[0].size
    assert (shares > 0.05).sum() >= 3, shares  # a varied class map, not a constant one
    assert (whole.argmax(0) == tiled.argmax(0)).mean() >= 0.99
    interior = (slice(None), slice(32, -32), slice(32, -32))
    np.testing.assert_allclose(tiled[interior], whole[interior], atol=1e-3)


def test_seam_free_against_one_whole_image_pass_checkpoint(segmenter, real_512):
    # ResNet's receptive field (~130 px) is larger than what overlap 64 keeps away from tile
    # borders (32 px), so the probabilities differ a little; the class maps must not.
    whole = segmenter.probabilities(real_512, plain(512, 0, 1))
    tiled = segmenter.probabilities(real_512, plain(128, 64, 8))
    assert (whole.argmax(0) == tiled.argmax(0)).mean() >= 0.99
    diff = np.abs(tiled - whole)[:, 32:-32, 32:-32]
    assert diff.mean() < 0.01 and np.percentile(diff, 99) < 0.05, (diff.mean(), np.percentile(diff, 99))


def test_gaussian_weights_and_tile_starts():
    w = gaussian_weights(64)
    assert w.shape == (64, 64) and w.dtype == np.float32 and w.min() >= 1e-3 and w.max() == 1.0
    assert np.allclose(w, w.T) and np.allclose(w, w[::-1, ::-1])
    assert not w.flags.writeable  # cached: a caller must not be able to corrupt later runs
    assert tile_starts(100, 128, 64) == [0]
    assert tile_starts(256, 128, 64) == [0, 64, 128]
    assert tile_starts(300, 128, 64) == [0, 64, 128, 172]


# --------------------------------------------------------------------------- progress and cancel


def count_forwards(seg: Segmenter) -> list:
    calls = []
    seg.model.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    return calls


def test_progress_is_monotonic_and_reaches_total(real_512):
    seg = custom_segmenter("vanilla_unet")
    forwards = count_forwards(seg)
    reports = []
    seg.segment(real_512[:200, :260], plain(64, 16, 5), progress=lambda done, total: reports.append((done, total)))
    total = len(tile_starts(200, 64, 48)) * len(tile_starts(260, 64, 48))
    assert {t for _, t in reports} == {total}
    done = [d for d, _ in reports]
    assert done == sorted(done) and len(set(done)) == len(done) and done[-1] == total
    assert len(reports) == len(forwards) == -(-total // 5)
    assert sum(forwards) == total


def test_cancel_stops_after_at_most_one_batch(real_512):
    seg = custom_segmenter("vanilla_unet")
    forwards = count_forwards(seg)
    reports = []
    with pytest.raises(Cancelled):
        seg.segment(real_512[:200, :200], TileSettings(64, 16, 4), progress=lambda d, t: reports.append(d),
                    should_cancel=lambda: bool(reports))  # the user clicks cancel after the first report
    assert len(forwards) == 1 and reports == [4]

    forwards.clear()
    with pytest.raises(Cancelled):
        seg.segment(real_512, TileSettings(64, 16, 4), should_cancel=lambda: True)
    assert forwards == []


# --------------------------------------------------------------------------- bad settings and input


@pytest.mark.parametrize("settings, message", [
    (TileSettings(128, 128, 4), r"Overlap 128 must be at least 0 and smaller than the tile \(128\)"),
    (TileSettings(128, 200, 4), r"Overlap 200 .*smaller than the tile"),
    (TileSettings(128, -8, 4), r"Overlap -8 must be at least 0"),
    (TileSettings(100, 16, 4), r"Tile size 100 must be a positive multiple of 8"),
    (TileSettings(4, 0, 4), r"Tile size 4 must be a positive multiple of 8"),
    (TileSettings(0, 0, 4), r"Tile size 0"),
    (TileSettings(128, 32, 0), r"Batch size must be at least 1, got 0"),
])
def test_bad_settings_are_clear_errors(segmenter, real_rgb, settings, message):
    with pytest.raises(InferenceSettingsError, match=message):
        segmenter.segment(real_rgb, settings)
    with pytest.raises(InferenceSettingsError, match=message):
        settings.checked(8)


def test_nan_pixels_are_refused(segmenter, real_rgb):
    image = real_rgb.astype(np.float32) / 255
    image[10, 20, 1] = np.nan
    with pytest.raises(ImageReadError, match="NaN"):
        segmenter.segment(image)
    image[10, 20, 1] = np.inf
    with pytest.raises(ImageReadError, match="infinite"):
        segmenter.segment(image)


@pytest.mark.parametrize("shape", [(5, 64, 64), (2, 5, 64, 64), (64, 64, 7)])
def test_stacks_are_refused(segmenter, shape):
    with pytest.raises(ImageReadError, match=r"not a 2-D gray, RGB or RGBA image") as info:
        segmenter.segment(np.zeros(shape, np.uint8))
    assert str(shape) in str(info.value)


def test_empty_image_is_refused(segmenter):
    with pytest.raises(ImageReadError, match="empty"):
        segmenter.segment(np.zeros((0, 64, 3), np.uint8))


# --------------------------------------------------------------------------- eval mode


def test_inference_runs_in_eval_mode(real_rgb):
    # A model handed over in training mode (e.g. straight from the trainer) must not update
    # its batch-norm statistics, nor apply dropout, while segmenting.
    torch.manual_seed(0)
    cfg = ModelConfig("unet", "resnet18", num_classes=len(CLASSES), encoder_depth=3)
    model = build_model(cfg)
    seg = Segmenter(model, CheckpointMeta(model=cfg, classes=list(CLASSES)), CPU)
    expected = seg.probabilities(real_rgb, TileSettings(128, 32))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    model.train()
    seen = []
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_pre_hook(lambda module, inputs: seen.append(module.training))
    got = seg.probabilities(real_rgb, TileSettings(128, 32))
    assert seen and not any(seen)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed during inference"
    np.testing.assert_array_equal(got, expected)

    drop = custom_segmenter("vanilla_unet")
    drop.model.train()
    a = drop.probabilities(real_rgb[:100, :100], TileSettings(64, 16))
    b = drop.probabilities(real_rgb[:100, :100], TileSettings(64, 16))
    np.testing.assert_array_equal(a, b)  # deterministic: no dropout, no batch statistics


def test_loaded_segmenter_is_in_eval_mode_on_cpu(segmenter):
    assert not segmenter.model.training
    assert segmenter.classes == CLASSES
    assert all(p.device.type == "cpu" for p in segmenter.model.parameters())


def test_alpha_never_enters_the_intensity_statistics():
    """A 16-bit RGBA image (opaque alpha at 65535): eager, lazy and channel-first sources
    normalise alike, and as the RGB image without its alpha does."""
    import dask.array as da

    from napari_medseg.inference.source import ImageSource

    rgb = (np.random.default_rng(0).random((300, 200, 3)) * 4000).astype(np.uint16)
    rgba = np.concatenate([rgb, np.full((300, 200, 1), 65535, np.uint16)], -1)
    sources = [ImageSource(rgba, 3), ImageSource(da.from_array(rgba, chunks=(64, 64, 4)), 3),
               ImageSource(da.from_array(np.moveaxis(rgba, -1, 0).copy(), chunks=(4, 64, 64)), 3)]
    reference = ImageSource(rgb, 3)
    for source in sources:
        assert source.value_range == reference.value_range
        assert np.array_equal(source.rows01(0, 300), reference.rows01(0, 300))
