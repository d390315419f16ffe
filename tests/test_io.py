"""The I/O core on real data: images (io/images.py), dataset folders (io/dataset.py), PanNuke folds (io/pannuke.py).

Every image here is a real CoNSeP patch or MoNuSeg image from ../shared/data (or a file
written from one); synthetic arrays are used only where a property cannot come from real
data (NaN, negative labels, 0x0, 4-D/5-D stacks).
"""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_medseg.io import (
    ImageReadError,
    image_suffix,
    read_image,
    read_label_map,
    to_rgb_float,
    validate_image_array,
    write_label_map,
)
from napari_medseg.io.dataset import (
    DatasetError,
    open_dataset,
    read_classes,
    write_classes,
    write_sample,
)
from napari_medseg.io.pannuke import (
    PANNUKE_CLASSES,
    convert_pannuke,
    is_pannuke_fold,
    read_pannuke_fold,
)

CONSEP_CLASSES = ["background", "other", "inflammatory", "epithelial", "spindle"]
PATCH = "train_1_005"  # real CoNSeP patch: classes {0, 2, 4}, 54 nuclei
MONU = "TCGA-21-5784-01Z-00-DX1"  # real MoNuSeg image, 1000x1000, 398 nuclei


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def patch(consep) -> dict[str, np.ndarray]:
    """One real CoNSeP patch: RGB image, class map, instance map."""
    return {
        "image": read_image(consep / "images" / f"{PATCH}.png"),
        "labels": read_label_map(consep / "labels" / f"{PATCH}.tif"),
        "instances": read_label_map(consep / "instances" / f"{PATCH}.tif"),
    }


@pytest.fixture(scope="module")
def gray(patch) -> np.ndarray:
    """The real patch as 8-bit gray (luma), as a gray microscope would give it."""
    return np.asarray(Image.fromarray(patch["image"]).convert("L"))


def truncate(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True if instance maps a and b hold the same instances up to relabelling (0 = background in both)."""
    if a.shape != b.shape or not np.array_equal(a == 0, b == 0):
        return False
    fg = a > 0
    pairs = np.unique(np.stack([a[fg].astype(np.int64), b[fg].astype(np.int64)]), axis=1)
    return pairs.shape[1] == np.unique(a[fg]).size == np.unique(b[fg]).size


def test_same_partition_helper(patch):
    inst = patch["instances"]
    relabelled = np.where(inst > 0, 1000 - inst.astype(np.int64), 0)
    assert same_partition(inst, relabelled)
    merged = np.where(inst == 2, 1, inst)  # two real nuclei made one
    assert not same_partition(inst, merged) and not same_partition(merged, inst)
    assert not same_partition(inst, np.where(inst == 3, 0, inst))  # one nucleus lost


# --------------------------------------------------------------------------- reading images


def test_read_png_real_patch(consep, patch):
    image = patch["image"]
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8
    with Image.open(consep / "images" / f"{PATCH}.png") as im:
        assert np.array_equal(image, np.asarray(im.convert("RGB")))
    # real H&E: pink/purple, not a flat or blank array
    assert image.std() > 20 and image[..., 0].mean() > image[..., 1].mean()


def test_read_monuseg_image(monuseg):
    image = read_image(monuseg / "images" / f"{MONU}.png")
    assert image.shape == (1000, 1000, 3) and image.dtype == np.uint8 and image.std() > 20


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg", ".JPG"])
def test_read_jpeg_written_from_real_patch(tmp_path, patch, suffix):
    path = tmp_path / f"patch{suffix}"
    Image.fromarray(patch["image"]).save(path, format="JPEG", quality=95)
    image = read_image(path)
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8
    # lossy, but close to the original
    assert np.abs(image.astype(int) - patch["image"]).mean() < 3


@pytest.mark.parametrize("suffix", [".tif", ".tiff", ".TIF"])
@pytest.mark.parametrize("compression", [None, "zlib"])
def test_read_tiff_rgb(tmp_path, patch, suffix, compression):
    path = tmp_path / f"patch{suffix}"
    tifffile.imwrite(path, patch["image"], photometric="rgb", compression=compression)
    image = read_image(path)
    assert image.dtype == np.uint8 and np.array_equal(image, patch["image"])


def test_image_suffix():
    assert image_suffix("a/B.TIF") == ".tif"
    assert image_suffix("x.ome.tif") == ".tif"
    assert image_suffix("x.ome.tiff") == ".tiff"
    assert image_suffix("noext") == ""


@pytest.mark.parametrize(
    "layout",
    ["YXS", "CYX", "TZCYX", "TZYXS", "gray TZCYX"],
)
def test_read_ome_tiff(tmp_path, patch, gray, layout):
    rgb = patch["image"]
    chw = np.ascontiguousarray(np.moveaxis(rgb, -1, 0))
    data, axes, photometric, expected = {
        "YXS": (rgb, "YXS", "rgb", rgb),
        "CYX": (chw, "CYX", "minisblack", rgb),  # channel-first, as many OME writers store it
        "TZCYX": (chw[None, None], "TZCYX", "minisblack", rgb),  # singleton T and Z
        "TZYXS": (rgb[None, None], "TZYXS", "rgb", rgb),
        "gray TZCYX": (gray[None, None, None], "TZCYX", "minisblack", gray),
    }[layout]
    path = tmp_path / "patch.ome.tif"
    tifffile.imwrite(path, data, ome=True, metadata={"axes": axes}, photometric=photometric)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
    image = read_image(path)
    assert image.dtype == np.uint8 and np.array_equal(image, expected)


@pytest.mark.parametrize(
    "shape_of",
    [
        lambda a: a[None, None],  # (1, 1, H, W, 3): OME T, Z
        lambda a: np.moveaxis(a, -1, 0)[None, None],  # (1, 1, 3, H, W)
        lambda a: np.moveaxis(a, -1, 0),  # (3, H, W) channel-first
        lambda a: a[None],  # (1, H, W, 3)
    ],
    ids=["TZYXS", "TZCYX", "CYX", "ZYXS"],
)
def test_validate_squeezes_singleton_axes_and_moves_channels(patch, shape_of):
    assert np.array_equal(validate_image_array(shape_of(patch["image"])), patch["image"])


def test_validate_gray_with_singleton_axes(gray):
    for arr in (gray[None], gray[..., None], gray[None, None, None], gray[None, :, :, None]):
        out = validate_image_array(arr)
        assert out.shape == gray.shape and np.array_equal(out, gray)


def test_validate_channel_first_rgba_drops_alpha(patch):
    rgba = np.concatenate([patch["image"], np.full((256, 256, 1), 7, np.uint8)], axis=-1)
    assert np.array_equal(validate_image_array(np.moveaxis(rgba, -1, 0)), patch["image"])


def test_one_pixel_high_or_wide_images_keep_their_shape(tmp_path, patch, gray):
    # a 1-row RGB strip must not be squeezed into a (W, 3) "gray" image
    row, col = patch["image"][:1], patch["image"][:, :1]
    assert validate_image_array(row).shape == (1, 256, 3)
    assert validate_image_array(col).shape == (256, 1, 3)
    Image.fromarray(row).save(tmp_path / "row.png")
    assert np.array_equal(read_image(tmp_path / "row.png"), row)
    assert validate_image_array(gray[:1]).shape == (1, 256)
    tifffile.imwrite(tmp_path / "row.tif", gray[:1])
    assert np.array_equal(read_image(tmp_path / "row.tif"), gray[:1])
    # and a 1-row label map is still a 2-D label map
    write_label_map(tmp_path / "row_labels.tif", patch["labels"][:1])
    assert np.array_equal(read_label_map(tmp_path / "row_labels.tif"), patch["labels"][:1])


def test_multipage_tiff_with_one_image_and_a_thumbnail(tmp_path, patch):
    path = tmp_path / "with_thumb.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(patch["image"], photometric="rgb")
        tw.write(patch["image"][::4, ::4], photometric="rgb", subfiletype=1)  # reduced-resolution page
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == 2
    assert np.array_equal(read_image(path), patch["image"])


def test_pyramidal_tiff_reads_full_resolution(tmp_path, patch):
    path = tmp_path / "pyramid.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(patch["image"], photometric="rgb", subifds=1)
        tw.write(patch["image"][::2, ::2], photometric="rgb", subfiletype=1)
    assert np.array_equal(read_image(path), patch["image"])


def test_read_16bit_gray_tiff_and_png(tmp_path, gray):
    g16 = gray.astype(np.uint16) * 257
    tifffile.imwrite(tmp_path / "g16.tif", g16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    for name in ("g16.tif", "g16.png"):
        image = read_image(tmp_path / name)
        assert image.dtype == np.uint16 and np.array_equal(image, g16)  # dtype kept on read


def test_read_float_tiff_keeps_dtype(tmp_path, gray):
    f = gray.astype(np.float32) / 255
    tifffile.imwrite(tmp_path / "f.tif", f)
    image = read_image(tmp_path / "f.tif")
    assert image.dtype == np.float32 and np.array_equal(image, f)


def test_read_gray_png(tmp_path, gray):
    Image.fromarray(gray).save(tmp_path / "g.png")
    image = read_image(tmp_path / "g.png")
    assert image.shape == (256, 256) and image.dtype == np.uint8 and np.array_equal(image, gray)


def test_read_rgba_png_shows_transparent_pixels_as_glass(tmp_path, patch):
    rgb = patch["image"]
    opaque = patch["labels"] > 0
    alpha = np.where(opaque, 255, 0).astype(np.uint8)  # alpha 0 on background
    Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA").save(tmp_path / "rgba.png")
    image = read_image(tmp_path / "rgba.png")
    # what any viewer shows: the opaque pixels as they are, the transparent ones white (glass), not
    # the colour stored under them (often black: a tissue finder and a model take it for tissue)
    assert image.shape == (256, 256, 3) and np.array_equal(image[opaque], rgb[opaque])
    assert (image[~opaque] == 255).all()
    Image.fromarray(np.dstack([rgb, np.full(alpha.shape, 255, np.uint8)]), mode="RGBA").save(tmp_path / "opaque.png")
    assert np.array_equal(read_image(tmp_path / "opaque.png"), rgb)  # opaque RGBA: alpha dropped


def test_read_gray_alpha_png_drops_alpha(tmp_path, gray):
    Image.fromarray(np.dstack([gray, np.full_like(gray, 128)]), mode="LA").save(tmp_path / "la.png")
    image = read_image(tmp_path / "la.png")
    assert image.shape == (256, 256) and np.array_equal(image, gray)


def test_read_palette_png(tmp_path, patch):
    Image.fromarray(patch["image"]).quantize(64).save(tmp_path / "p.png")
    image = read_image(tmp_path / "p.png")
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8
    assert np.abs(image.astype(int) - patch["image"]).mean() < 10


# --------------------------------------------------------------------------- to_rgb_float


def test_to_rgb_float_uint8_divides_by_255(patch):
    out = to_rgb_float(patch["image"])
    assert out.dtype == np.float32 and out.shape == (256, 256, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, patch["image"].astype(np.float32) / 255.0)


def test_to_rgb_float_gray_replicated_and_rgb_averaged(patch, gray):
    out = to_rgb_float(gray)
    assert out.shape == (256, 256, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray / np.float32(255))
    one = to_rgb_float(patch["image"], channels=1)
    assert one.shape == (256, 256, 1) and one.dtype == np.float32
    np.testing.assert_allclose(one[..., 0], (patch["image"] / 255.0).mean(-1), atol=1e-6)
    np.testing.assert_array_equal(to_rgb_float(gray, channels=1)[..., 0], gray / np.float32(255))


def test_to_rgb_float_16bit_uses_percentiles(gray):
    g16 = gray.astype(np.uint16) * 257
    out = to_rgb_float(g16)
    assert out.dtype == np.float32 and out.shape == (256, 256, 3)
    assert out.min() == 0.0 and out.max() == 1.0
    lo, hi = np.percentile(g16.astype(np.float32), (0.5, 99.5))
    assert lo > 0 or hi < 65535  # the real patch does not fill the range: this is a real rescale
    expected = np.clip((g16.astype(np.float32) - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(out[..., 0], expected, atol=1e-6)
    assert np.array_equal(out[..., 0], out[..., 2])
    # only the tails are clipped (ties at the percentile values may add a few pixels)
    assert (out == 0).mean() < 0.02 and (out == 1).mean() < 0.02
    # 12-bit data in a 16-bit container maps to the same [0, 1] image: the scale is the image's own
    np.testing.assert_allclose(to_rgb_float(gray.astype(np.uint16) * 16), out, atol=1e-5)


def test_to_rgb_float_float_rules(gray):
    unit = gray.astype(np.float32) / 255
    np.testing.assert_array_equal(to_rgb_float(unit)[..., 1], unit)  # already in [0, 1]: as is
    wide = unit.astype(np.float64) * 3000 - 100  # e.g. a background-subtracted float image
    out = to_rgb_float(wide)
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    np.testing.assert_allclose(out, to_rgb_float(gray.astype(np.uint16) * 257), atol=1e-5)


def test_to_rgb_float_constant_image_does_not_divide_by_zero():
    out = to_rgb_float(np.full((8, 8), 1000, np.uint16))
    assert np.isfinite(out).all() and out.shape == (8, 8, 3)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("suffix,kind", [(".png", "PNG"), (".jpg", "JPG"), (".tif", "TIF")])
def test_corrupt_file(tmp_path, suffix, kind):
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(b"this is not an image at all\n" * 20)
    msg = rf"Cannot read 'corrupt{suffix}': the file is corrupt, truncated or not a {kind} file"
    with pytest.raises(ImageReadError, match=msg):
        read_image(path)


def test_corrupt_file_with_wrong_extension(tmp_path, consep):
    # a PNG named .tif: the TIFF reader refuses it with the same message
    path = tmp_path / "really_png.tif"
    shutil.copy(consep / "images" / f"{PATCH}.png", path)
    with pytest.raises(ImageReadError, match="corrupt, truncated or not a TIF file"):
        read_image(path)


def test_truncated_real_png(tmp_path, consep):
    path = truncate(consep / "images" / f"{PATCH}.png", tmp_path / "half.png")
    with pytest.raises(ImageReadError, match=r"'half.png': the file is corrupt, truncated or not a PNG file \(OSError"):
        read_image(path)


def test_truncated_real_jpeg(tmp_path, patch):
    full = tmp_path / "full.jpg"
    Image.fromarray(patch["image"]).save(full, quality=95)
    path = truncate(full, tmp_path / "half.jpg")
    with pytest.raises(ImageReadError, match=r"'half.jpg': the file is corrupt, truncated or not a JPG file"):
        read_image(path)


@pytest.mark.parametrize("sub", ["labels", "instances"])
def test_truncated_real_label_tiff(tmp_path, consep, sub):
    path = truncate(consep / sub / f"{PATCH}.tif", tmp_path / "half.tif")
    with pytest.raises(ImageReadError, match=r"'half.tif': the file is corrupt, truncated: its header places "
                                             r"image data up to byte [\d,]+ but the file ends at byte [\d,]+\."):
        read_label_map(path)


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_truncated_image_tiff(tmp_path, monuseg, compression):
    image = read_image(monuseg / "images" / f"{MONU}.png")
    full = tmp_path / "full.tif"
    tifffile.imwrite(full, image, photometric="rgb", compression=compression, rowsperstrip=64)
    path = truncate(full, tmp_path / "half.tif")
    with pytest.raises(ImageReadError, match=r"'half.tif': the file is corrupt, truncated: its header places "
                                             r"image data up to byte [\d,]+ but the file ends at byte [\d,]+\."):
        read_image(path)


@pytest.mark.parametrize("name,shown", [("a.bmp", "'.bmp'"), ("a.npy", "'.npy'"), ("noext", r"'\(none\)'")])
def test_unknown_extension(tmp_path, consep, name, shown):
    path = tmp_path / name
    shutil.copy(consep / "images" / f"{PATCH}.png", path)  # real pixels, wrong name
    with pytest.raises(ImageReadError, match=rf"Cannot read '{name}': unknown extension {shown}\. Supported: \.tif"):
        read_image(path)


def test_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "nope.png")


@pytest.mark.parametrize("name", ["empty.png", "empty.jpg", "empty.tif"])
def test_empty_file(tmp_path, name):
    (tmp_path / name).touch()
    with pytest.raises(ImageReadError, match=rf"Cannot read '{name}': the file is empty \(0 bytes\)"):
        read_image(tmp_path / name)
    if not name.endswith(".jpg"):
        with pytest.raises(ImageReadError, match=r"the file is empty \(0 bytes\)"):
            read_label_map(tmp_path / name)


STACK_MSG = r"is not a 2-D gray, RGB or RGBA image\. Stacks, time series and multi-channel"


@pytest.mark.parametrize(
    "shape",
    [(2, 3, 64, 64), (2, 64, 64, 3), (2, 2, 3, 64, 64), (2, 1, 64, 64, 3),
     (2, 64, 64), (5, 64, 64), (64, 64, 5), (64, 64, 2)],
)
def test_validate_refuses_stacks(shape):
    with pytest.raises(ImageReadError, match=rf"image: shape \({', '.join(map(str, shape))}\) {STACK_MSG}"):
        validate_image_array(np.zeros(shape, np.uint8))


@pytest.mark.parametrize("n", [4, 5])
def test_saved_4d_5d_tiff_refused(tmp_path, gray, n):
    stack = np.stack([gray, 255 - gray])  # a real 2-plane stack
    data = np.stack([stack] * 3, axis=1) if n == 4 else np.stack([np.stack([stack] * 3, axis=1)] * 2)
    assert data.ndim == n
    path = tmp_path / f"stack{n}d.tif"
    tifffile.imwrite(path, data, photometric="minisblack")
    shape = ", ".join(map(str, data.shape))
    with pytest.raises(ImageReadError, match=rf"'stack{n}d.tif': shape \({shape}\) \(axes '\w+'\) {STACK_MSG}"):
        read_image(path)


def test_saved_z_stack_ome_refused(tmp_path, gray):
    path = tmp_path / "z.ome.tif"
    tifffile.imwrite(path, np.stack([gray, gray])[None], ome=True, metadata={"axes": "TZYX"})
    with pytest.raises(ImageReadError, match=rf"shape \(2, 256, 256\) \(axes 'ZYX'\) {STACK_MSG}"):
        read_image(path)


@pytest.mark.parametrize("shape", [(0, 0), (0, 0, 3), (0, 16), (3, 0, 0)])
def test_empty_image_array(shape):
    with pytest.raises(ImageReadError, match=r"the image is empty \(shape"):
        validate_image_array(np.zeros(shape, np.uint8))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_pixels(tmp_path, gray, bad):
    f = gray.astype(np.float32) / 255
    f[100, 100] = bad
    with pytest.raises(ImageReadError, match="contains NaN or infinite pixels"):
        validate_image_array(f)
    with pytest.raises(ImageReadError, match="contains NaN or infinite pixels"):
        to_rgb_float(f)
    tifffile.imwrite(tmp_path / "nan.tif", f)
    with pytest.raises(ImageReadError, match="'nan.tif': the image contains NaN or infinite pixels"):
        read_image(tmp_path / "nan.tif")


@pytest.mark.parametrize("dtype", [bool, np.complex64, object])
def test_unsupported_pixel_types(dtype):
    with pytest.raises(ImageReadError, match=r"unsupported pixel type .*expected integer or float pixels"):
        validate_image_array(np.zeros((8, 8), dtype))


def test_label_map_float_with_integer_values_is_accepted(tmp_path, patch):
    tifffile.imwrite(tmp_path / "f.tif", patch["labels"].astype(np.float32))
    labels = read_label_map(tmp_path / "f.tif")
    assert np.issubdtype(labels.dtype, np.integer) and np.array_equal(labels, patch["labels"])


def test_label_map_non_integer_refused(tmp_path, patch):
    f = patch["labels"].astype(np.float32)
    f[0, 0] = 0.5
    tifffile.imwrite(tmp_path / "f.tif", f)
    with pytest.raises(ImageReadError, match=r"Labels 'f.tif': label maps need integer values, got float32"):
        read_label_map(tmp_path / "f.tif")
    f[0, 0] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", f)
    with pytest.raises(ImageReadError, match="label maps need integer values"):
        read_label_map(tmp_path / "nan.tif")


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_label_map_negative_refused(tmp_path, patch, dtype):
    labels = patch["instances"].astype(dtype)
    labels[labels == 1] = -1
    tifffile.imwrite(tmp_path / "neg.tif", labels)
    with pytest.raises(ImageReadError, match="Labels 'neg.tif': negative label values are not allowed"):
        read_label_map(tmp_path / "neg.tif")


def test_label_map_not_2d_or_wrong_format(tmp_path, patch):
    Image.fromarray(patch["image"]).save(tmp_path / "rgb.png")
    with pytest.raises(ImageReadError, match=r"Labels 'rgb.png': expected a 2-D label map, got shape \(256, 256, 3\)"):
        read_label_map(tmp_path / "rgb.png")
    Image.fromarray(patch["labels"]).save(tmp_path / "labels.jpg")
    with pytest.raises(ImageReadError, match="Cannot read labels 'labels.jpg': use .tif or .png"):
        read_label_map(tmp_path / "labels.jpg")


def test_label_map_png_reads(tmp_path, patch):
    Image.fromarray(patch["labels"]).save(tmp_path / "labels.png")
    assert np.array_equal(read_label_map(tmp_path / "labels.png"), patch["labels"])


# --------------------------------------------------------------------------- write_label_map


def test_write_label_map_round_trip_real(tmp_path, consep, patch):
    for key in ("labels", "instances"):
        path = write_label_map(tmp_path / "out" / f"{key}.tif", patch[key])  # parent folder created
        back = read_label_map(path)
        assert np.array_equal(back, patch[key])
        with tifffile.TiffFile(path) as tif:
            assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
    # the real instance map is stored as uint16 but has 54 nuclei: written as uint8
    assert patch["instances"].dtype == np.uint16 and patch["instances"].max() == 54
    assert read_label_map(tmp_path / "out" / "instances.tif").dtype == np.uint8


def test_write_label_map_smallest_dtype(tmp_path, monuseg, patch):
    real = read_label_map(monuseg / "instances" / f"{MONU}.tif")  # 398 nuclei: needs uint16
    assert real.max() == 398
    cases = [(patch["labels"].astype(np.int64), np.uint8), (real.astype(np.int32), np.uint16),
             (real.astype(np.int64) * 1000, np.uint32), (real.astype(np.uint64) << np.uint64(33), np.uint64)]
    for i, (labels, dtype) in enumerate(cases):
        path = write_label_map(tmp_path / f"l{i}.tif", labels)
        back = read_label_map(path)
        assert back.dtype == dtype, (i, back.dtype)
        assert np.array_equal(back, labels)
    empty = write_label_map(tmp_path / "zeros.tif", np.zeros((4, 4), np.int64))
    assert read_label_map(empty).dtype == np.uint8


@pytest.mark.parametrize(
    "labels,msg",
    [(np.zeros((4, 4), np.float32), "expected a 2-D integer array, got float32"),
     (np.zeros((4, 4, 3), np.uint8), r"expected a 2-D integer array, got uint8 \(4, 4, 3\)"),
     (np.array([[0, -1], [2, 3]], np.int32), "negative label values are not allowed")],
)
def test_write_label_map_refuses(tmp_path, labels, msg):
    with pytest.raises(ValueError, match=msg):
        write_label_map(tmp_path / "bad.tif", labels)
    assert list(tmp_path.iterdir()) == []


def test_write_label_map_leaves_no_part_files(tmp_path, patch):
    for _ in range(2):  # also when replacing an existing file
        write_label_map(tmp_path / "labels.tif", patch["labels"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.tif"]


def test_write_label_map_failure_keeps_old_file(tmp_path, patch, monkeypatch):
    path = write_label_map(tmp_path / "labels.tif", patch["labels"])
    before = path.read_bytes()

    def broken_imwrite(file, *args, **kwargs):
        Path(file).write_bytes(b"II*\x00 half a tiff")  # a partial write, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tifffile, "imwrite", broken_imwrite)
    with pytest.raises(OSError, match="No space left"):
        write_label_map(path, patch["instances"])
    assert path.read_bytes() == before
    assert np.array_equal(read_label_map(path), patch["labels"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.tif"]  # the partial file is gone


def test_write_label_map_permissions_follow_umask(tmp_path, patch):
    path = write_label_map(tmp_path / "labels.tif", patch["labels"])
    (tmp_path / "plain").touch()  # created the ordinary way, under the same umask
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)


# --------------------------------------------------------------------------- dataset folders


def test_open_real_consep(consep):
    ds = open_dataset(consep, require_labels=True)
    assert len(ds) == 432 and ds.classes == CONSEP_CLASSES
    assert ds.has_labels and ds.has_instances and "CoNSeP" in ds.source
    assert ds.stems == sorted(ds.stems) and len(set(ds.stems)) == 432
    assert all(s.startswith("train_") for s in ds.stems)
    assert {s.rsplit("_", 1)[0] for s in ds.stems} == {f"train_{i}" for i in range(1, 28)}  # 27 images x 16
    sample = ds.load(PATCH)
    assert sample.stem == PATCH
    assert sample.image.shape == (256, 256, 3) and sample.image.dtype == np.uint8
    assert sample.labels.shape == (256, 256) and sample.labels.dtype == np.uint8
    assert sample.instances.shape == (256, 256) and sample.instances.dtype == np.uint16
    assert set(np.unique(sample.labels)) == {0, 2, 4} and sample.instances.max() == 54
    assert np.array_equal(sample.labels > 0, sample.instances > 0)  # every nucleus pixel has a class


def test_open_real_monuseg(monuseg):
    ds = open_dataset(monuseg, require_labels=True)
    assert len(ds) == 13 and ds.classes == ["background", "nucleus"]
    sample = ds.load(MONU)
    assert sample.image.shape == (1000, 1000, 3) and sample.instances.max() == 398
    assert np.array_equal(sample.labels, (sample.instances > 0).astype(np.uint8))


def test_binary_labels_from_instances_without_labels_folder(monuseg, tmp_path):
    root = tmp_path / "monuseg_nolabels"
    stems = sorted(p.stem for p in (monuseg / "images").glob("*.png"))[:2]
    for sub, ext in (("images", ".png"), ("instances", ".tif")):
        (root / sub).mkdir(parents=True)
        for stem in stems:
            shutil.copy(monuseg / sub / f"{stem}{ext}", root / sub / f"{stem}{ext}")
    shutil.copy(monuseg / "classes.json", root / "classes.json")
    ds = open_dataset(root, require_labels=True)  # 2 classes + instances: labels are implied
    assert not ds.has_labels and ds.has_instances and ds.stems == stems
    for sample in ds:
        assert sample.labels.dtype == np.uint8
        assert np.array_equal(sample.labels, sample.instances > 0)
        assert np.array_equal(sample.labels, read_label_map(monuseg / "labels" / f"{sample.stem}.tif"))


def test_multiclass_without_labels_folder(small_consep):
    shutil.rmtree(small_consep / "labels")
    ds = open_dataset(small_consep)
    sample = ds.load("train_1_005")
    assert sample.labels is None and sample.instances is not None
    with pytest.raises(DatasetError, match="has no 'labels/' folder, which this task needs"):
        open_dataset(small_consep, require_labels=True)


def test_small_consep_iterates(small_consep, consep):
    ds = open_dataset(small_consep)
    assert ds.stems == [f"train_{i}_{j:03d}" for i in (1, 2, 3) for j in (5, 6)]
    samples = list(ds)
    assert [s.stem for s in samples] == ds.stems
    ref = open_dataset(consep)
    for s in samples:
        r = ref.load(s.stem)
        assert np.array_equal(s.image, r.image) and np.array_equal(s.labels, r.labels)


def test_non_image_files_in_images_are_ignored(small_consep):
    (small_consep / "images" / "README.txt").write_text("notes")
    (small_consep / "images" / "sub").mkdir()
    assert len(open_dataset(small_consep)) == 6


def test_missing_mask(small_consep):
    (small_consep / "labels" / "train_2_005.tif").unlink()
    with pytest.raises(DatasetError, match=r"consep_small/labels lacks masks for 1 image: train_2_005"):
        open_dataset(small_consep)


def test_missing_instance_mask(small_consep):
    (small_consep / "instances" / "train_3_006.tif").unlink()
    with pytest.raises(DatasetError, match=r"consep_small/instances lacks masks for 1 image: train_3_006"):
        open_dataset(small_consep)


def test_extra_mask(small_consep):
    shutil.copy(small_consep / "labels" / "train_1_005.tif", small_consep / "labels" / "train_9_999.tif")
    with pytest.raises(DatasetError, match=r"consep_small/labels has 1 mask without an image: train_9_999"):
        open_dataset(small_consep)


def test_mask_size_mismatch(small_consep):
    labels = read_label_map(small_consep / "labels" / "train_1_006.tif")
    write_label_map(small_consep / "labels" / "train_1_006.tif", labels[:128])
    ds = open_dataset(small_consep)  # indexing does not read pixels
    ds.load("train_1_005")
    msg = r"labels/train_1_006.tif has shape \(128, 256\) but its image is \(256, 256\)"
    with pytest.raises(DatasetError, match=msg):
        ds.load("train_1_006")


def test_instance_size_mismatch(small_consep):
    inst = read_label_map(small_consep / "instances" / "train_2_006.tif")
    write_label_map(small_consep / "instances" / "train_2_006.tif", inst[:, :200])
    msg = r"instances/train_2_006.tif has shape \(256, 200\) but its image is \(256, 256\)"
    with pytest.raises(DatasetError, match=msg):
        open_dataset(small_consep).load("train_2_006")


def test_class_id_beyond_classes_json(small_consep):
    labels = read_label_map(small_consep / "labels" / "train_3_005.tif")
    labels[labels == 4] = 5  # the real spindle nuclei get an id classes.json does not list
    write_label_map(small_consep / "labels" / "train_3_005.tif", labels)
    with pytest.raises(DatasetError, match=r"holds class id 5, but classes.json lists only 5 classes \(ids 0..4\)"):
        open_dataset(small_consep).load("train_3_005")


def test_missing_classes_json(small_consep):
    (small_consep / "classes.json").unlink()
    with pytest.raises(DatasetError, match=r"missing classes.json \(expected"):
        open_dataset(small_consep)


@pytest.mark.parametrize(
    "text,msg",
    [("{not json", "not valid JSON with a 'classes' list"),
     ('{"names": ["background", "nucleus"]}', "not valid JSON with a 'classes' list"),
     ('["background", "nucleus"]', "not valid JSON with a 'classes' list"),
     ('{"classes": null}', "not valid JSON with a 'classes' list"),
     ('{"classes": "background"}', "not valid JSON with a 'classes' list"),  # not 10 one-letter classes
     ('{"classes": ["background"]}', "needs at least two classes"),
     ("", "not valid JSON")],
)
def test_invalid_classes_json(small_consep, text, msg):
    (small_consep / "classes.json").write_text(text)
    with pytest.raises(DatasetError, match=msg):
        open_dataset(small_consep)


def test_classes_json_round_trip(tmp_path):
    write_classes(tmp_path, CONSEP_CLASSES, source="test")
    assert read_classes(tmp_path) == (CONSEP_CLASSES, "test")
    assert json.loads((tmp_path / "classes.json").read_text())["classes"] == CONSEP_CLASSES
    assert [p.name for p in tmp_path.iterdir()] == ["classes.json"]


def test_empty_images_folder(small_consep):
    for p in (small_consep / "images").iterdir():
        p.unlink()
    with pytest.raises(DatasetError, match=r"consep_small/images holds no images \(\.tif"):
        open_dataset(small_consep)


def test_not_a_dataset_folder(tmp_path):
    with pytest.raises(DatasetError, match="is not a dataset folder: it has no 'images/' subfolder"):
        open_dataset(tmp_path)


def test_duplicate_stems(small_consep):
    image = read_image(small_consep / "images" / "train_1_005.png")
    tifffile.imwrite(small_consep / "images" / "train_1_005.tif", image, photometric="rgb")
    with pytest.raises(DatasetError, match="two images share the stem 'train_1_005'"):
        open_dataset(small_consep)


@pytest.mark.parametrize("suffix", [".ome.tif", ".ome.tiff", ".OME.TIF"])
def test_ome_tiff_images_in_dataset_folder(small_consep, suffix):
    png = small_consep / "images" / "train_1_005.png"
    image = read_image(png)
    png.unlink()
    tifffile.imwrite(small_consep / "images" / f"train_1_005{suffix}", np.moveaxis(image, -1, 0),
                     ome=True, metadata={"axes": "CYX"}, photometric="minisblack")
    ds = open_dataset(small_consep)
    assert "train_1_005" in ds.stems and len(ds) == 6
    sample = ds.load("train_1_005")
    assert np.array_equal(sample.image, image) and sample.labels.shape == (256, 256)


def test_write_sample_round_trip(tmp_path, patch, gray):
    root = tmp_path / "ds"
    write_classes(root, CONSEP_CLASSES)
    write_sample(root, "a", patch["image"], patch["labels"], patch["instances"])
    write_sample(root, "b", gray.astype(np.uint16) * 257, patch["labels"], patch["instances"])
    assert (root / "images" / "a.png").is_file() and (root / "images" / "b.tif").is_file()
    ds = open_dataset(root)
    assert ds.stems == ["a", "b"]
    a, b = ds.load("a"), ds.load("b")
    assert np.array_equal(a.image, patch["image"]) and np.array_equal(a.labels, patch["labels"])
    assert np.array_equal(a.instances, patch["instances"])
    assert b.image.dtype == np.uint16 and np.array_equal(b.image, gray.astype(np.uint16) * 257)
    assert not [p for p in root.rglob("*") if p.name.endswith(".part")]


# --------------------------------------------------------------------------- PanNuke

# CoNSeP class -> PanNuke channel (0-4); channel 4 is used too, so all five are exercised.
CONSEP_TO_CHANNEL = {1: 4, 2: 1, 3: 0, 4: 2}
# train_10_002 and train_19_005 hold all four CoNSeP classes; train_4_010 holds no nucleus at all.
PANNUKE_STEMS = ["train_1_005", "train_10_002", "train_4_010", "train_19_005"]
TISSUES = ["Breast", "Colon", "Adrenal_gland", "Bile-duct"]


@pytest.fixture(scope="module")
def pannuke_source(consep) -> dict:
    """Four real CoNSeP patches in PanNuke's own array format (float64, as PanNuke ships)."""
    n = len(PANNUKE_STEMS)
    images = np.zeros((n, 256, 256, 3), np.float64)
    masks = np.zeros((n, 256, 256, 6), np.float64)
    class_maps, instance_maps = [], []
    for i, stem in enumerate(PANNUKE_STEMS):
        images[i] = read_image(consep / "images" / f"{stem}.png")
        labels = read_label_map(consep / "labels" / f"{stem}.tif")
        inst = read_label_map(consep / "instances" / f"{stem}.tif").astype(np.int64)
        expected = np.zeros_like(labels)
        for cls, ch in CONSEP_TO_CHANNEL.items():
            in_class = labels == cls
            ids = inst * in_class
            if i % 2:  # odd images: ids restart at 1 in every channel, so the same id recurs across channels
                present = np.unique(ids[ids > 0])
                lut = np.zeros(int(inst.max()) + 1, np.int64)
                lut[present] = np.arange(1, present.size + 1)
                ids = lut[ids]
            masks[i, ..., ch] = ids
            expected[in_class] = ch + 1
        masks[i, ..., 5] = (inst == 0).astype(np.float64)  # PanNuke's background channel
        class_maps.append(expected)
        instance_maps.append(inst)
    # real data: every nucleus pixel has a class, so the channels hold the whole instance map
    assert all(np.array_equal(c > 0, s > 0) for c, s in zip(class_maps, instance_maps))
    assert set(np.concatenate([np.unique(c) for c in class_maps])) == {0, 1, 2, 3, 5}
    assert instance_maps[2].max() == 0
    return {"images": images, "masks": masks, "types": np.array(TISSUES),
            "classes": class_maps, "instances": instance_maps}


def _write_fold(root: Path, src: dict, nested: bool, **override) -> Path:
    arrays = {**{k: src[k] for k in ("images", "masks", "types")}, **override}
    if nested:  # the official archive: Fold 1/images/fold1/{images,types}.npy, Fold 1/masks/fold1/masks.npy
        places = {"images": root / "images" / "fold1", "types": root / "images" / "fold1",
                  "masks": root / "masks" / "fold1"}
    else:
        places = dict.fromkeys(arrays, root)
    for name, arr in arrays.items():
        if arr is None:
            continue
        places[name].mkdir(parents=True, exist_ok=True)
        np.save(places[name] / f"{name}.npy", arr, allow_pickle=arr.dtype == object)
    return root


@pytest.fixture(scope="module", params=["flat", "nested"])
def pannuke_fold(request, pannuke_source, tmp_path_factory) -> Path:
    nested = request.param == "nested"
    base = tmp_path_factory.mktemp(f"pannuke_{request.param}")
    return _write_fold(base / ("Fold 1" if nested else "fold1"), pannuke_source, nested)


def test_pannuke_fold_layout_is_official(pannuke_fold, pannuke_source):
    images = np.load(next(pannuke_fold.rglob("images.npy")))
    masks = np.load(next(pannuke_fold.rglob("masks.npy")))
    types = np.load(next(pannuke_fold.rglob("types.npy")))
    assert images.shape == (4, 256, 256, 3) and images.dtype == np.float64
    assert masks.shape == (4, 256, 256, 6) and masks.dtype == np.float64
    assert types.dtype.kind == "U" and list(types) == TISSUES


def test_is_pannuke_fold(pannuke_fold, tmp_path, small_consep):
    assert is_pannuke_fold(pannuke_fold)
    images_npy = next(pannuke_fold.rglob("images.npy"))
    assert is_pannuke_fold(images_npy)  # the file itself, in the flat and the official nested layout
    assert not is_pannuke_fold(next(pannuke_fold.rglob("masks.npy")))
    assert not is_pannuke_fold(tmp_path) and not is_pannuke_fold(small_consep)
    assert not is_pannuke_fold(tmp_path / "missing")


def test_read_pannuke_fold_reproduces_maps(pannuke_fold, pannuke_source):
    for path in (pannuke_fold, next(pannuke_fold.rglob("images.npy"))):
        fold = read_pannuke_fold(path)
        assert fold.root == pannuke_fold
        assert len(fold) == 4 and fold.tissues == TISSUES
        assert isinstance(fold.images, np.memmap) and isinstance(fold.masks, np.memmap)
    for i in range(len(fold)):
        image = fold.image(i)
        assert image.dtype == np.uint8 and np.array_equal(image, pannuke_source["images"][i].astype(np.uint8))
        classes, instances = fold.class_and_instance_maps(i)
        assert classes.dtype == np.uint8 and instances.dtype == np.int32
        assert np.array_equal(classes, pannuke_source["classes"][i])
        assert same_partition(instances, pannuke_source["instances"][i])
        n = np.unique(pannuke_source["instances"][i]).size - 1
        assert np.array_equal(np.unique(instances), np.arange(n + 1))  # ids 1..n, unique per image
        assert (n > 10) == (i != 2)  # image 2 is a real patch without nuclei: all-zero maps


def test_convert_pannuke_writes_a_dataset_folder(pannuke_fold, pannuke_source, tmp_path):
    calls = []
    out = convert_pannuke(pannuke_fold, tmp_path / "out", progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    ds = open_dataset(out, require_labels=True)
    assert ds.classes == PANNUKE_CLASSES and "PanNuke" in ds.source
    assert ds.stems == sorted(f"{t}_{i}" for i, t in enumerate(TISSUES))
    for i, tissue in enumerate(TISSUES):
        sample = ds.load(f"{tissue}_{i}")
        assert np.array_equal(sample.image, pannuke_source["images"][i].astype(np.uint8))
        assert np.array_equal(sample.labels, pannuke_source["classes"][i])
        assert same_partition(sample.instances, pannuke_source["instances"][i])
    assert not [p for p in out.rglob("*") if p.name.endswith(".part")]


def test_cli_convert_pannuke(pannuke_fold, pannuke_source, tmp_path, capsys):
    from napari_medseg.cli import main

    out = tmp_path / "converted"
    assert main(["convert", "pannuke", str(pannuke_fold), str(out)]) == 0
    assert "wrote dataset folder" in capsys.readouterr().out
    ds = open_dataset(out)
    assert len(ds) == 4
    assert np.array_equal(ds.load("Colon_1").labels, pannuke_source["classes"][1])


def test_cli_convert_not_a_fold(tmp_path, capsys):
    from napari_medseg.cli import main

    assert main(["convert", "pannuke", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "is not a PanNuke fold: no images.npy" in capsys.readouterr().err


def test_pannuke_pickled_types_refused(pannuke_source, tmp_path):
    types = np.array(TISSUES, dtype=object)  # what np.save writes for a list of Python strings in an object array
    fold = _write_fold(tmp_path / "fold", pannuke_source, nested=True, types=types)
    with pytest.raises(DatasetError, match=r"types.npy: expected an array of strings, refusing a pickled object"):
        read_pannuke_fold(fold)


def test_pannuke_pickled_images_refused(pannuke_source, tmp_path):
    images = np.empty(4, dtype=object)
    fold = _write_fold(tmp_path / "fold", pannuke_source, nested=False, images=images)
    with pytest.raises(DatasetError, match=r"images.npy/masks.npy must be plain numeric arrays"):
        read_pannuke_fold(fold)


@pytest.mark.parametrize(
    "override,msg",
    [({"masks": "five_channels"}, r"masks.npy: expected \(N, H, W, 6\) matching images \(4, 256, 256\), "
                                   r"got \(4, 256, 256, 5\)"),
     ({"masks": "three_images"}, r"masks.npy: expected \(N, H, W, 6\) matching images \(4, 256, 256\), "
                                 r"got \(3, 256, 256, 6\)"),
     ({"masks": "smaller"}, r"matching images \(4, 256, 256\), got \(4, 128, 128, 6\)"),
     ({"images": "gray"}, r"images.npy: expected \(N, H, W, 3\), got \(4, 256, 256\)"),
     ({"types": "short"}, r"types.npy: 3 tissue types for 4 images"),
     ({"masks": None}, r"is not a PanNuke fold: no masks.npy in it")],
)
def test_pannuke_mismatched_shapes_refused(pannuke_source, tmp_path, override, msg):
    make = {
        "five_channels": lambda: pannuke_source["masks"][..., :5],
        "three_images": lambda: pannuke_source["masks"][:3],
        "smaller": lambda: pannuke_source["masks"][:, :128, :128],
        "gray": lambda: pannuke_source["images"][..., 0],
        "short": lambda: pannuke_source["types"][:3],
        None: lambda: None,
    }
    (key, what), = override.items()
    fold = _write_fold(tmp_path / "Fold 1", pannuke_source, nested=True, **{key: make[what]()})
    with pytest.raises(DatasetError, match=msg):
        read_pannuke_fold(fold)


def test_pannuke_two_folds_refused(pannuke_source, tmp_path):
    for k in (1, 2):
        _write_fold(tmp_path / f"Fold {k}", pannuke_source, nested=True)
    assert not is_pannuke_fold(tmp_path)
    with pytest.raises(DatasetError, match="2 files named images.npy; point to a single fold"):
        read_pannuke_fold(tmp_path)


def test_dataset_folders_skip_hidden_files_and_name_near_miss_masks(tmp_path):
    """A folder copied from a Mac carries "._<name>" files: not images, not masks. A mask saved
    as b.TIF (or b.ome.tif) is named in the error, not just reported missing."""
    from napari_medseg.io.dataset import DatasetError, open_dataset, write_classes, write_sample

    root = tmp_path / "ds"
    write_classes(root, ["background", "nucleus"])
    labels = np.zeros((16, 16), np.uint8)
    for stem in ("a", "b"):
        write_sample(root, stem, np.full((16, 16, 3), 200, np.uint8), labels)
    (root / "images" / "._a.png").write_bytes(b"\0\5\26\7" + b"\0" * 60)  # AppleDouble
    (root / "labels" / "._a.tif").write_bytes(b"\0\5\26\7" + b"\0" * 60)
    assert open_dataset(root).stems == ["a", "b"]
    (root / "labels" / "b.tif").rename(root / "labels" / "b.TIF")
    with pytest.raises(DatasetError, match=r"lacks masks for 1 image: b; b.TIF must be saved as .tif"):
        open_dataset(root)
    # instance maps all saved as PNG beside no labels/: named (a bare AttributeError had ended training)
    (root / "labels" / "b.TIF").rename(root / "labels" / "b.tif")
    (root / "instances").mkdir()
    for stem in ("a", "b"):
        (root / "labels" / f"{stem}.tif").rename(root / "instances" / f"{stem}.png")
    shutil.rmtree(root / "labels")  # its AppleDouble file too
    with pytest.raises(DatasetError, match=r"instances lacks masks for 2 images: a, b; a.png, b.png must be saved as .tif"):
        open_dataset(root, require_labels=True)
