"""Pixel-size-aware inference: an image whose µm/px is known is seen by the model at the pixel
size it was trained at, and every result comes back on the image's own grid (library, CLI,
re-threshold, slides). Checked on the real 20x Aperio slide with the shipped 40x model."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tifffile

from hostile import assert_refused, medseg
from napari_medseg.inference import Segmenter, TileSettings
from napari_medseg.inference import rescale
from napari_medseg.inference.rescale import (PixelSizeError, block_windows, checked_pixel_size, model_scale,
                                             resample, settings_at_image_scale)
from napari_medseg.inference.rethreshold import Thresholds, iter_segment_keeping
from napari_medseg.io import read_image
from napari_medseg.io.pixel_size import file_pixel_size_um
from napari_medseg.nuclei.measure import object_table
from napari_medseg.nuclei.watershed import InstanceSettings
from napari_medseg.inference.postprocess import PostprocessSettings
from napari_medseg.steps import run_steps

from conftest import DATA

CMU = DATA / "slides" / "CMU-1-Small-Region.svs"
CMU_PIXEL_SIZE = 0.499  # Aperio MPP of the slide (20x)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def at_40x(segmenter) -> Segmenter:
    """The tiny test model, told it was trained at 0.25 µm/px."""
    return Segmenter(segmenter.model, replace(segmenter.meta, pixel_size_um=0.25), segmenter.device)


@pytest.fixture(scope="module")
def cmu_crop() -> np.ndarray:
    from napari_medseg.io.slides import open_slide

    if not CMU.is_file():
        pytest.fail(f"Real test slide missing: {CMU}")
    return np.asarray(open_slide(CMU).levels[0][700:1084, 900:1284])[..., :3]


def test_scale_is_one_when_unknown_or_close():
    assert model_scale(None, 0.25) == 1.0 and model_scale(0.5, None) == 1.0
    assert model_scale(0.26, 0.25) == 1.0  # within the tolerance: not worth a blur
    assert model_scale(0.499, 0.25) == pytest.approx(1.996)
    assert model_scale(0.125, 0.25) == pytest.approx(0.5)
    assert checked_pixel_size(0) is None and checked_pixel_size("0.5") == 0.5
    for bad in (-1, float("nan"), float("inf"), "abc", [0.5]):
        with pytest.raises(PixelSizeError, match="µm per pixel"):
            checked_pixel_size(bad)


def test_pixel_sizes_are_converted_to_image_pixels():
    post, inst = settings_at_image_scale(2.0, PostprocessSettings(min_object_size=40, max_hole_size=0),
                                         InstanceSettings(min_distance=4, sigma=1.0, min_size=10, min_marker_size=4))
    assert (post.min_object_size, post.max_hole_size) == (10, 0)  # areas / 4; 0 stays off
    assert (inst.min_distance, inst.sigma, inst.min_size, inst.min_marker_size) == (2, 0.5, 2, 1)
    post, inst = settings_at_image_scale(0.5, PostprocessSettings(min_object_size=1), InstanceSettings(min_size=10))
    assert post.min_object_size == 1 and inst.min_size == 40 and inst.min_distance == 8
    assert settings_at_image_scale(1.0, post, inst) == (post, inst)


def test_block_windows_tile_the_image_once():
    for height, width, factor in ((100, 70, 2.0), (5000, 3000, 0.5), (33, 4097, 1.7), (9000, 5000, 0.25)):
        covered = np.zeros((height, width), np.int32)
        for (y0, y1, x0, x1), (wy0, wy1, wx0, wx1) in block_windows(height, width, factor):
            covered[y0:y1, x0:x1] += 1
            assert wy0 <= y0 < y1 <= wy1 and wx0 <= x0 < x1 <= wx1
        assert (covered == 1).all()


def test_blocks_stay_small_in_image_pixels_on_a_finer_image():
    """A block's window and its probabilities are float32 at image resolution: on an image 4x
    finer than the model a block is MODEL_BLOCK image px, not MODEL_BLOCK model px (8192² image
    px: a 6144² image took 1.5 GB traced in one block, 229 MB in nine)."""
    for factor in (0.25, 0.5, 0.8):
        pairs = block_windows(9000, 5000, factor)
        assert max(max(y1 - y0, x1 - x0) for (y0, y1, x0, x1), _ in pairs) == rescale.MODEL_BLOCK
        assert max(max(wy1 - wy0, wx1 - wx0) for _, (wy0, wy1, wx0, wx1) in pairs) <= \
            rescale.MODEL_BLOCK + 2 * math.ceil(rescale.MODEL_HALO / factor)
    side = max(y1 - y0 for (y0, y1, _, _), _ in block_windows(9000, 5000, 2.0))
    assert side == rescale.MODEL_BLOCK // 2  # a coarser image: MODEL_BLOCK model px, as before


def test_resample_keeps_range_and_shape(real_512):
    image = real_512[:37, :53] / np.float32(255)
    up = resample(image, (74, 106), channels_last=True)
    down = resample(up, (37, 53), channels_last=True)
    assert up.shape == (74, 106, 3) and down.shape == image.shape
    assert up.min() >= -1e-6 and up.max() <= 1 + 1e-6
    assert np.abs(down - image).mean() < 0.03  # a real H&E tile up and down again is close to the original


def test_close_pixel_size_changes_nothing(at_40x, real_512):
    plain = at_40x.segment(real_512[:128, :128])
    same = at_40x.segment(real_512[:128, :128], pixel_size_um=0.26)
    assert np.array_equal(plain, same) and not at_40x.last_report.notes


def test_results_on_the_image_grid(at_40x, real_512):
    """A 20x image: every output has the image's shape, probabilities sum to one, the report says so."""
    image = real_512[:96, :80]
    probabilities = np.zeros((5, 96, 80), np.float32)
    labels = at_40x.segment(image, probabilities_out=probabilities, pixel_size_um=0.5)
    assert labels.shape == (96, 80) and labels.dtype == np.uint8
    assert np.allclose(probabilities.sum(0), 1.0, atol=1e-4)
    assert np.array_equal(labels, probabilities.argmax(0))
    assert at_40x.last_report.tiles > 0 and "resampled x2" in at_40x.last_report.notes[-1]
    labels, instances = at_40x.segment_nuclei(image, pixel_size_um=0.5)
    assert instances.shape == (96, 80)


def test_blocks_are_seam_free(at_40x, real_512, monkeypatch):
    """Cut into many blocks (with halos) or run as one: the same class map, up to rounding at a few pixels."""
    image = real_512[:160, :160]
    whole = at_40x.segment(image, TileSettings(tile_size=128), pixel_size_um=0.5)
    monkeypatch.setattr(rescale, "MODEL_BLOCK", 96)  # 48 image px per block: 16 blocks
    assert len(block_windows(160, 160, 2.0)) == 16
    blocks = at_40x.segment(image, TileSettings(tile_size=128), pixel_size_um=0.5)
    assert (whole == blocks).mean() > 0.995


def test_cancel_between_blocks(at_40x, real_512, monkeypatch):
    from napari_medseg.steps import Cancelled

    monkeypatch.setattr(rescale, "MODEL_BLOCK", 96)
    seen = []
    with pytest.raises(Cancelled):
        at_40x.segment(real_512[:160, :160], pixel_size_um=0.5, progress=lambda d, t: seen.append((d, t)),
                       should_cancel=lambda: len(seen) >= 3)
    assert seen[0][1] == 16 * rescale.PROGRESS_PER_BLOCK


def test_rethreshold_keeps_the_scale(at_40x, real_512):
    """The kept run of a 20x image re-thresholds to what a fresh run gives, on the image's grid."""
    image = real_512[:96, :96]
    settings = InstanceSettings(min_size=12)
    labels, instances, kept = run_steps(iter_segment_keeping(at_40x, image, instance_settings=settings,
                                                             pixel_size_um=0.5))
    assert kept.scale == pytest.approx(2.0) and kept.probabilities.shape == (5, 96, 96)
    again, again_instances = kept.result(Thresholds(at_40x.foreground_threshold, settings.marker_threshold, 12))
    assert np.array_equal(again, labels) and np.array_equal(again_instances, instances)


def test_file_pixel_sizes(tmp_path):
    assert file_pixel_size_um(CMU) == pytest.approx(CMU_PIXEL_SIZE)
    image = np.zeros((16, 16, 3), np.uint8)
    tifffile.imwrite(tmp_path / "res.tif", image, resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    tifffile.imwrite(tmp_path / "dpi.tif", image, resolution=(72, 72), resolutionunit="INCH")  # an editor's default
    tifffile.imwrite(tmp_path / "ome.ome.tif", image, metadata={"axes": "YXS", "PhysicalSizeX": 0.2275,
                                                                "PhysicalSizeY": 0.2275})
    tifffile.imwrite(tmp_path / "bare.tif", image)
    assert file_pixel_size_um(tmp_path / "res.tif") == pytest.approx(0.5)
    assert file_pixel_size_um(tmp_path / "dpi.tif") is None  # 353 µm/px: not a microscope's
    assert file_pixel_size_um(tmp_path / "ome.ome.tif") == pytest.approx(0.2275)
    assert file_pixel_size_um(tmp_path / "bare.tif") is None
    (tmp_path / "broken.tif").write_bytes(b"II*\x00garbage")
    assert file_pixel_size_um(tmp_path / "broken.tif") is None
    assert file_pixel_size_um(DATA / "consep_train" / "images" / "train_1_005.png") is None


def test_cmu_nuclei_sizes_agree_in_um2(cmu_crop):
    """The real 20x Aperio slide with the shipped 40x model: nuclei measured in µm² agree whether
    the engine resamples the 20x crop itself or is given the crop already resampled to 0.25 µm/px;
    taken as if it were 40x (no pixel size), the model fragments and undercounts the nuclei."""
    model = Segmenter.load("default", device="cpu", backend="torch")
    rescaled_labels, rescaled = model.segment_nuclei(cmu_crop, pixel_size_um=CMU_PIXEL_SIZE)
    side = round(cmu_crop.shape[0] * CMU_PIXEL_SIZE / 0.25)
    upsampled = (resample(cmu_crop / np.float32(255), (side, side), channels_last=True).clip(0, 1) * 255).round()
    up_labels, up = model.segment_nuclei(upsampled.astype(np.uint8), pixel_size_um=0.25)
    native_labels, native = model.segment_nuclei(cmu_crop)

    def areas(instances, labels, pixel_size):
        table = object_table(instances, labels, model.classes, pixel_size_um=pixel_size)
        return np.asarray(table["area_um2"])

    a_rescaled = areas(rescaled, rescaled_labels, CMU_PIXEL_SIZE)
    a_up = areas(up, up_labels, CMU_PIXEL_SIZE * cmu_crop.shape[0] / side)  # ~0.25 µm/px
    assert abs(len(a_rescaled) - len(a_up)) <= 0.1 * len(a_up)
    assert abs(np.median(a_rescaled) / np.median(a_up) - 1) < 0.15
    assert abs(a_rescaled.sum() / a_up.sum() - 1) < 0.15  # the nucleus area of the crop
    assert len(areas(native, native_labels, CMU_PIXEL_SIZE)) < 0.75 * len(a_up)


def test_cli_pixel_size(tmp_path, real_512, tiny_checkpoint):
    image = np.ascontiguousarray(real_512[:96, :96])
    tifffile.imwrite(tmp_path / "at20x.tif", image, resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    at_40x = tmp_path / "tiny40x.safetensors"
    _with_pixel_size(tiny_checkpoint, at_40x, 0.25)
    proc = medseg("predict", tmp_path / "at20x.tif", "--model", at_40x, "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert "resampled x2" in proc.stderr
    assert tifffile.imread(tmp_path / "out" / "labels" / "at20x.tif").shape == (96, 96)
    proc = medseg("predict", tmp_path / "at20x.tif", "--model", at_40x, "--out", tmp_path / "out2",
                  "--pixel-size", "none")
    assert proc.returncode == 0 and "resampled" not in proc.stderr
    proc = medseg("predict", tmp_path / "at20x.tif", "--model", at_40x, "--out", tmp_path / "out3",
                  "--pixel-size", "1.0")
    assert proc.returncode == 0 and "resampled x4" in proc.stderr
    for bad in ("-1", "0", "abc", "nan"):
        assert_refused(medseg("predict", tmp_path / "at20x.tif", "--out", tmp_path / "o", "--pixel-size", bad),
                       "--pixel-size")
    assert not (tmp_path / "o").exists()


def test_a_40x_image_and_its_20x_copy_give_the_same_nuclei_in_um(tmp_path, monuseg):
    """The shipped 40x model on a MoNuSeg crop as scanned (0.25 µm/px) and on the same crop halved
    (0.5 µm/px), told by --pixel-size or by the TIFF's resolution tags alone: the same nuclei in
    count and µm² (measured on the full image: 398 vs 389 nuclei, mean 28.5 vs 29.0 µm²), each
    result the size of its input and on its grid."""
    from PIL import Image

    from napari_medseg.io import read_label_map

    full = Image.fromarray(read_image(monuseg / "images" / "TCGA-21-5784-01Z-00-DX1.png")[:512, :512, :3])
    half = full.resize((256, 256), Image.LANCZOS)
    full.save(tmp_path / "at40x.png")
    half.save(tmp_path / "at20x.png")
    tifffile.imwrite(tmp_path / "at20x.tif", np.asarray(half), photometric="rgb", resolution=(2e4, 2e4),
                     resolutionunit="CENTIMETER")
    runs = {"40x": (tmp_path / "at40x.png", []), "flag": (tmp_path / "at20x.png", ["--pixel-size", "0.5"]),
            "tags": (tmp_path / "at20x.tif", [])}
    found = {}
    for name, (image, flags) in runs.items():
        proc = medseg("predict", image, "--out", tmp_path / name, *flags)
        assert proc.returncode == 0, proc.stderr
        assert ("resampled x2" in proc.stderr) == (name != "40x")
        stem = image.stem
        found[name] = (read_label_map(tmp_path / name / "labels" / f"{stem}.tif"),
                       read_label_map(tmp_path / name / "instances" / f"{stem}.tif"))
    full_labels, full_nuclei = found["40x"]
    assert full_labels.shape == (512, 512)
    for name in ("flag", "tags"):
        labels, nuclei = found[name]
        assert labels.shape == nuclei.shape == (256, 256)
        assert np.array_equal(labels, found["flag"][0]) and np.array_equal(nuclei, found["flag"][1])
    counts = {name: len(np.unique(n[n > 0])) for name, (_, n) in found.items()}
    mean_um2 = {name: (n > 0).sum() * (0.25 if name == "40x" else 0.5) ** 2 / counts[name]
                for name, (_, n) in found.items()}
    assert counts["40x"] > 80 and abs(counts["flag"] / counts["40x"] - 1) < 0.1, counts
    assert abs(mean_um2["flag"] / mean_um2["40x"] - 1) < 0.1, mean_um2
    # on the image's grid: the 20x foreground matches the 40x one at every other pixel, unshifted
    small, large = found["flag"][0] > 0, full_labels[::2, ::2] > 0
    dice = lambda a, b: 2 * (a & b).sum() / (a.sum() + b.sum())  # noqa: E731
    assert dice(small, large) > 0.9
    assert dice(small, large) >= max(dice(np.roll(small, shift, axis), large) for shift in (-1, 1) for axis in (0, 1))


def _with_pixel_size(checkpoint: Path, target: Path, pixel_size: float) -> None:
    from napari_medseg.models import load_checkpoint, save_checkpoint

    model, meta = load_checkpoint(checkpoint)
    save_checkpoint(target, model, replace(meta, pixel_size_um=pixel_size))


def test_napari_opens_a_tiff_at_its_pixel_size_and_segment_uses_it(make_napari_viewer, tmp_path, real_512,
                                                                   tiny_checkpoint):
    """A TIFF recording 0.5 µm/px opens in µm (scale and metadata); Segment sees it at the
    model's 0.25 µm/px and its results sit on the image's grid and place."""
    from napari_medseg._napari.segment_widget import FILE_MODEL

    tifffile.imwrite(tmp_path / "at20x.tif", np.ascontiguousarray(real_512[:96, :96]),
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    at_40x = tmp_path / "tiny40x.safetensors"
    _with_pixel_size(tiny_checkpoint, at_40x, 0.25)
    viewer = make_napari_viewer()
    (image,) = viewer.open(str(tmp_path / "at20x.tif"), plugin="napari-medseg")
    assert tuple(image.scale) == (0.5, 0.5) and image.metadata["pixel_size_um"] == pytest.approx(0.5)
    _, segment = viewer.window.add_plugin_dock_widget("napari-medseg", "Segment")
    segment.model_source.value = FILE_MODEL
    segment.checkpoint.value = at_40x
    segment.image_layer.value = image
    labels = segment.run(threaded=False)
    assert labels.data.shape == (96, 96) and tuple(labels.scale) == (0.5, 0.5)
    assert "resampled x2" in segment.status.value


def test_segment_takes_a_pixel_size_typed_in_its_form_for_an_image_that_records_none(make_napari_viewer, tmp_path,
                                                                                      cmu_crop):
    """A 20x crop saved as PNG records no pixel size: Segment took it as the model's 40x without a
    word (a third fewer nuclei), and a napari user had no way to say otherwise but the console.
    Now the status says so, and a size typed in the form is used as the file's own would be,
    recorded on the result for Objects' µm²."""
    from PIL import Image as PILImage

    PILImage.fromarray(cmu_crop).save(tmp_path / "cmu20x.png")
    viewer = make_napari_viewer()
    (image,) = viewer.open(str(tmp_path / "cmu20x.png"), plugin="napari-medseg")
    _, segment = viewer.window.add_plugin_dock_widget("napari-medseg", "Segment")
    segment.image_layer.value, segment.device.value = image, "cpu"
    assert segment.pixel_size.native.specialValueText() == "image's own" and segment.pixel_size.value == 0
    segment.run(threaded=False)
    as_40x = int(segment.last_instances_layer.data.max())
    assert "Note: The image records no pixel size: taken as the model's 0.25 µm/px (40x)" in segment.status.value
    assert "for another magnification set 'pixel size' above (0.5 at 20x)" in segment.status.value

    segment.pixel_size.value = CMU_PIXEL_SIZE
    labels = segment.run(threaded=False)
    nuclei = segment.last_instances_layer
    assert "records no pixel size" not in segment.status.value and "resampled x2" in segment.status.value
    assert labels.metadata["pixel_size_um"] == nuclei.metadata["pixel_size_um"] == CMU_PIXEL_SIZE
    # the API with the runtime the form chose ('auto': OpenVINO fp16 where the CPU has it, whose
    # counts differ from PyTorch's by a nucleus or two on this crop)
    api = Segmenter.load("default", device="cpu", backend=segment.backend.value)
    expected = api.segment_nuclei(cmu_crop, pixel_size_um=CMU_PIXEL_SIZE)[1]
    assert int(nuclei.data.max()) == int(expected.max()) > 1.3 * as_40x  # as the API given the size
    _, objects = viewer.window.add_plugin_dock_widget("napari-medseg", "Objects")
    objects.class_layer.value = labels
    table = objects.measure()
    np.testing.assert_allclose(table["area_um2"], table["area"] * CMU_PIXEL_SIZE ** 2)

    segment.pixel_size.value = 0.01  # no microscope's: refused, nothing added
    count = len(viewer.layers)
    assert segment.run(threaded=False) is None and len(viewer.layers) == count
    assert "pixel size 0.01 µm/px is not one a microscope gives" in segment.status.value
