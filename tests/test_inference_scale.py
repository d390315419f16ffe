"""Inference at scale: lazy inputs, memory bound, glass skipping, TTA, OOM fallback,
inference-only model rewrites, post-processing, probability stores and bad input."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import tifffile
import torch
from scipy import ndimage as ndi
from torch import nn

from napari_medseg.io.images import ImageReadError
from napari_medseg.inference import InferenceMemoryError, InferenceSettingsError, PostprocessSettings, Segmenter, TileSettings
from napari_medseg.io.lazy import open_tiff_lazy, should_open_lazily
from napari_medseg.models import CheckpointMeta, ModelConfig, build_model, load_checkpoint
from napari_medseg.models.optimise import fold_batchnorm, optimise_for_inference
from napari_medseg.inference.postprocess import postprocess_class_map
from napari_medseg.inference.windows import blend_weights, cosine_weights, glass_fraction, tile_starts

CLASSES = ["background", "other", "inflammatory", "epithelial", "spindle"]
CPU = torch.device("cpu")


def plain(tile: int, overlap: int, batch: int = 4, **kw) -> TileSettings:
    return TileSettings(tile, overlap, batch, skip_background=False, **kw)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def consep_labels(consep) -> np.ndarray:
    from napari_medseg.io.images import read_label_map

    return read_label_map(consep / "labels" / "train_4_000.tif").astype(np.uint8)


# --------------------------------------------------------------------------- lazy inputs


def test_lazy_tiled_tiff_streams_to_the_same_class_map(segmenter, real_512, tmp_path):
    import dask.array as da

    image = np.concatenate([real_512, real_512[::-1]], axis=0)  # 1024 x 512
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, image, tile=(64, 64), compression="zlib")
    (lazy,) = open_tiff_lazy(path)
    assert isinstance(lazy, da.Array) and lazy.shape == image.shape
    settings = TileSettings(128, 32, 4)
    expected = segmenter.segment(image, settings)
    np.testing.assert_array_equal(segmenter.segment(lazy, settings), expected)
    # channel-first lazy data (as in many OME-TIFFs) is read the same way
    channel_first = da.from_array(np.moveaxis(image, -1, 0), chunks=(3, 100, 100))
    np.testing.assert_array_equal(segmenter.segment(channel_first, settings), expected)
    # leading singleton axes (OME's T and Z) are dropped
    np.testing.assert_array_equal(segmenter.segment(da.from_array(image[None, None], chunks=(1, 1, 256, 256, 3)),
                                                    settings), expected)


def test_pyramid_tiff_opens_as_levels_and_big_files_open_lazily(real_512, tmp_path):
    image = np.tile(real_512, (2, 2, 1))
    pyramid = tmp_path / "pyramid.ome.tif"
    with tifffile.TiffWriter(pyramid) as tw:
        tw.write(image, subifds=2, tile=(128, 128), metadata={"axes": "YXS"})
        tw.write(image[::2, ::2], subfiletype=1, tile=(128, 128))
        tw.write(image[::4, ::4], subfiletype=1, tile=(128, 128))
    levels = open_tiff_lazy(pyramid)
    assert [lv.shape for lv in levels] == [(1024, 1024, 3), (512, 512, 3), (256, 256, 3)]
    np.testing.assert_array_equal(np.asarray(levels[1][100:110, 200:220]), image[::2, ::2][100:110, 200:220])
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, image, tile=(256, 256))
    assert should_open_lazily(pyramid)  # a pyramid is always opened lazily
    assert not should_open_lazily(flat)  # 1 Mpx: read it
    assert should_open_lazily(flat, min_pixels=1_000_000)
    assert not should_open_lazily(tmp_path / "missing.tif")


def test_memory_grows_with_width_not_height(segmenter, real_512):
    import dask.array as da

    settings = TileSettings(128, 32, 4)
    peaks = {}
    for height in (512, 4096):
        lazy = da.tile(da.from_array(real_512[:, :256], chunks=(128, 256, 3)), (height // 512, 1, 1))
        out = np.empty((height, 256), np.uint8)  # the result itself is the caller's
        tracemalloc.start()
        segmenter.segment(lazy, settings, out=out)
        peaks[height] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    full_probabilities = len(CLASSES) * 4096 * 256 * 4  # what keeping every tile's output would take
    assert peaks[4096] < 1.15 * peaks[512], peaks  # 8x the rows, (almost) the same memory
    assert peaks[4096] < full_probabilities / 3, (peaks, full_probabilities)


# --------------------------------------------------------------------------- glass, TTA, blends


def test_glass_tiles_are_background_without_running_the_model(segmenter, real_512):
    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal(242, 3, (512, 256, 3)), 0, 255).astype(np.uint8)
    image = np.concatenate([real_512[:, :256], glass], axis=1)  # tissue left, glass right
    forwards = []
    hook = segmenter.model.register_forward_hook(lambda m, i, o: forwards.append(i[0].shape[0]))
    try:
        with_skip = segmenter.segment(image, TileSettings(128, 32, 4))
        skipped, tiles = segmenter.last_report.skipped_background, segmenter.last_report.tiles
        ran = sum(forwards)
        forwards.clear()
        without = segmenter.segment(image, plain(128, 32, 4))
    finally:
        hook.remove()
    assert skipped > 0 and ran == tiles - skipped and sum(forwards) == tiles
    assert (with_skip[:, 300:] == 0).all()  # glass is background
    # tissue far from the glass (more than a tile away) is untouched by the skipping
    np.testing.assert_array_equal(with_skip[:, :128], without[:, :128])
    assert glass_fraction(image[:, 256:].astype(np.float32) / 255, 0.85) == 1.0
    # gray images (e.g. fluorescence, dark background) are never skipped
    segmenter.segment(image.mean(-1).astype(np.uint8), TileSettings(128, 32, 4))
    assert segmenter.last_report.skipped_background == 0


def test_tta_is_the_mean_over_flips(segmenter, real_512):
    image = real_512[:208, :208]  # tile 64, stride 48: starts 0, 48, 96, 144 — the same flipped
    assert tile_starts(208, 64, 48) == [0, 48, 96, 144]
    tta = segmenter.probabilities(image, plain(64, 16, 4, tta=True))
    manual = np.zeros_like(tta)
    for axes in ((), (0,), (1,), (0, 1)):
        flipped = np.flip(image, axes) if axes else image
        p = segmenter.probabilities(np.ascontiguousarray(flipped), plain(64, 16, 4))
        manual += np.flip(p, tuple(a + 1 for a in axes)) if axes else p
    np.testing.assert_allclose(tta, manual / 4, atol=1e-5)
    assert not np.allclose(tta, segmenter.probabilities(image, plain(64, 16, 4)), atol=1e-3)  # it did something


def test_cosine_blend_weights_and_tiling():
    w = cosine_weights(64)
    assert w.shape == (64, 64) and w.max() == 1.0 and w.min() >= 1e-3 and not w.flags.writeable
    assert np.allclose(w, w.T) and np.allclose(w, w[::-1, ::-1])
    assert blend_weights(64, "cosine") is w
    with pytest.raises(InferenceSettingsError, match="Unknown blend 'box'"):
        TileSettings(64, 16, blend="box").checked(8)


# --------------------------------------------------------------------------- devices and memory


class RaisesOOMAbove(nn.Module):
    """Wraps a model; a batch larger than ``limit`` raises the out-of-memory error CUDA would."""

    def __init__(self, model: nn.Module, limit: int):
        super().__init__()
        self.model, self.limit, self.sizes = model, limit, []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return self.model(x)


def test_out_of_memory_halves_the_batch_and_finishes(segmenter, real_512):
    expected = segmenter.probabilities(real_512[:256], plain(64, 16, 8))
    wrapper = RaisesOOMAbove(segmenter.model, limit=2)
    seg = Segmenter(wrapper, segmenter.meta, CPU)
    got = seg.probabilities(real_512[:256], plain(64, 16, 8))
    # oneDNN may pick another kernel for another batch size: equal to float rounding, same argmax
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_array_equal(got.argmax(0), expected.argmax(0))
    report = seg.last_report
    assert report.batch_size == 2 and report.out_of_memory_retries == 2  # 8 -> 4 -> 2
    assert wrapper.sizes[:3] == [8, 4, 2] and max(wrapper.sizes[3:]) == 2  # never tries 8 again
    assert any("batch size lowered to 2" in note for note in report.notes)

    hopeless = Segmenter(RaisesOOMAbove(segmenter.model, limit=0), segmenter.meta, CPU)
    with pytest.raises(InferenceMemoryError, match=r"single 64² tile; use a smaller tile size or the CPU"):
        hopeless.segment(real_512[:128, :128], plain(64, 16, 4))


def test_folded_channels_last_model_predicts_the_same(tiny_checkpoint, segmenter, real_512):
    raw, meta = load_checkpoint(tiny_checkpoint)
    reference = Segmenter(raw.eval(), meta, CPU)
    settings = plain(128, 32, 4, channels_last=False)
    np.testing.assert_allclose(segmenter.probabilities(real_512, TileSettings(128, 32, 4, skip_background=False)),
                               reference.probabilities(real_512, settings), atol=1e-4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in segmenter.model.modules())  # all folded
    model = build_model(ModelConfig("unet", "resnet18", num_classes=5, encoder_depth=3))
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(model)  # training mode: folding would freeze batch statistics
    assert fold_batchnorm(model.eval()) > 0


def test_optimise_for_inference_refuses_a_rewrite_that_changes_outputs():
    class BnNotAfterConv(nn.Module):  # children in conv, bn order, but bn is applied to the input
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.conv(self.bn(x))

    torch.manual_seed(0)
    model = BnNotAfterConv()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    probe = torch.rand(1, 3, 16, 16)
    assert optimise_for_inference(model, check_input=probe) is model  # the check caught it
    with torch.inference_mode():
        assert torch.allclose(model(probe), BnNotAfterConv.forward(model, probe))


# --------------------------------------------------------------------------- post-processing


def _reference_clean(class_map: np.ndarray, min_size: int, max_hole: int) -> np.ndarray:
    """Slow and obvious: one component at a time."""
    fg = class_map > 0
    labels, n = ndi.label(fg)
    for i in range(1, n + 1):
        if (labels == i).sum() < min_size:
            fg[labels == i] = False
    bg, n = ndi.label(~fg)
    h, w = fg.shape
    for i in range(1, n + 1):
        region = bg == i
        touches_border = region[0].any() or region[-1].any() or region[:, 0].any() or region[:, -1].any()
        if not touches_border and region.sum() <= max_hole:
            fg[region] = True
    return fg


def test_postprocess_blockwise_matches_whole_and_reference(consep_labels):
    rng = np.random.default_rng(1)
    labels = consep_labels.copy()
    for _ in range(60):  # specks of 1-20 px
        y, x = rng.integers(0, 250, 2)
        labels[y:y + rng.integers(1, 5), x:x + rng.integers(1, 5)] = rng.integers(1, 5)
    for _ in range(30):  # holes of 1-36 px punched into nuclei
        ys, xs = np.nonzero(labels > 0)
        k = rng.integers(len(ys))
        labels[ys[k]:ys[k] + rng.integers(1, 7), xs[k]:xs[k] + rng.integers(1, 7)] = 0
    settings = PostprocessSettings(min_object_size=30, max_hole_size=40)
    whole = postprocess_class_map(labels.copy(), settings, block_rows=10_000)
    for rows in (7, 50, 128):
        np.testing.assert_array_equal(postprocess_class_map(labels.copy(), settings, block_rows=rows), whole)
    np.testing.assert_array_equal(whole > 0, _reference_clean(labels, 30, 40))
    kept = (whole > 0) & (labels > 0)
    np.testing.assert_array_equal(whole[kept], labels[kept])  # surviving pixels keep their class
    assert (whole != labels).sum() > 100  # it really removed and filled things
    assert postprocess_class_map(labels.copy(), PostprocessSettings()).tobytes() == labels.tobytes()  # off


def test_segment_applies_postprocessing(segmenter, real_512):
    settings = plain(128, 32, 4)
    raw = segmenter.segment(real_512, settings)
    cleaned = segmenter.segment(real_512, settings, postprocess=PostprocessSettings(50, 30))
    np.testing.assert_array_equal(cleaned, postprocess_class_map(raw.copy(), PostprocessSettings(50, 30)))


# --------------------------------------------------------------------------- output stores


def test_probabilities_to_a_float16_memmap_and_labels_to_a_given_array(segmenter, real_512, tmp_path):
    settings = TileSettings(128, 32, 4)
    expected = segmenter.probabilities(real_512[:300, :400], settings)
    store = np.lib.format.open_memmap(tmp_path / "p.npy", mode="w+", dtype=np.float16, shape=expected.shape)
    out = np.lib.format.open_memmap(tmp_path / "l.npy", mode="w+", dtype=np.uint8, shape=(300, 400))
    labels = segmenter.segment(real_512[:300, :400], settings, out=out, probabilities_out=store)
    assert labels is out
    np.testing.assert_allclose(np.asarray(store, np.float32), expected, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(out), expected.argmax(0))
    with pytest.raises(InferenceSettingsError, match=r"Output array \(10, 10\) does not match the image \(300, 400\)"):
        segmenter.segment(real_512[:300, :400], settings, out=np.zeros((10, 10), np.uint8))


# --------------------------------------------------------------------------- bad input


def test_lazy_bad_input_is_refused_clearly(segmenter):
    import dask.array as da

    image = np.random.default_rng(0).random((300, 200, 3), dtype=np.float32) * 4  # floats beyond 1: percentiles
    image[250, 10, 0] = np.nan
    with pytest.raises(ImageReadError, match="NaN or infinite"):
        segmenter.segment(da.from_array(image, chunks=(64, 200, 3)), plain(64, 16))
    with pytest.raises(ImageReadError, match=r"shape \(5, 64, 64, 2\) is not a 2-D gray, RGB or RGBA image"):
        segmenter.segment(da.zeros((5, 64, 64, 2), dtype=np.uint8), plain(64, 16))
    with pytest.raises(ImageReadError, match="empty"):
        segmenter.segment(da.zeros((0, 64, 3), dtype=np.uint8), plain(64, 16))
    with pytest.raises(ImageReadError, match="unsupported pixel type"):
        segmenter.segment(da.zeros((64, 64), dtype=bool), plain(64, 16))


def test_tile_larger_than_the_image_and_one_pixel_images(segmenter, real_512):
    for shape in ((1, 1), (1, 300), (300, 1), (40, 40)):
        image = np.ascontiguousarray(real_512[:shape[0], :shape[1]])
        labels = segmenter.segment(image, TileSettings(256, 64, 4))
        assert labels.shape == shape and labels.dtype == np.uint8
