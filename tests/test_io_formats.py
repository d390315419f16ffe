"""Files as other tools write them: stacks that are not RGB, OME files with a macro image first,
an editor's dpi on a pyramid, ImageJ and OME calibrations in other units, transparency, indexed and
1-bit masks, 16-bit colour PNGs."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_medseg.io.images import ImageReadError, read_image, read_label_map
from napari_medseg.io.pixel_size import file_pixel_size_um
from napari_medseg.io.slides import open_slide, tiff_pixel_size_um


@pytest.mark.parametrize("axes", ["ZYX", "TYX"])
def test_three_planes_of_a_stack_are_not_taken_for_rgb(tmp_path, axes):
    path = tmp_path / "stack.ome.tif"
    tifffile.imwrite(path, np.zeros((3, 32, 40), np.uint16), metadata={"axes": axes})
    with pytest.raises(ImageReadError, match=f"axes '{axes}'.*not a 2-D gray, RGB or RGBA image"):
        read_image(path)
    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, np.zeros((32, 40, 3), np.uint8), photometric="rgb")
    assert read_image(rgb).shape == (32, 40, 3)


def test_an_ome_file_with_an_overview_first_gives_the_scans_pixels_and_size(tmp_path):
    path = tmp_path / "two.ome.tif"
    scan = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(np.zeros((32, 64, 3), np.uint8), photometric="rgb",
                 metadata={"axes": "YXS", "PhysicalSizeX": 16.0, "PhysicalSizeY": 16.0})
        tw.write(scan, photometric="rgb", metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25})
    assert np.array_equal(read_image(path), scan)
    assert tiff_pixel_size_um(path)[:2] == (0.25, "ome") and file_pixel_size_um(path) == 0.25


def test_a_pyramid_saved_at_an_editors_72_dpi_has_no_pixel_size(tmp_path):
    path = tmp_path / "pyramid.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(np.zeros((512, 512, 3), np.uint8), photometric="rgb", tile=(256, 256), subifds=1,
                 resolution=(72, 72), resolutionunit="INCH")
        tw.write(np.zeros((256, 256, 3), np.uint8), photometric="rgb", tile=(256, 256), subfiletype=1)
    assert open_slide(path).pixel_size_um is None  # 352.8 µm/px: no microscope's


@pytest.mark.parametrize("size, unit", [(250, "nm"), (0.00025, "mm"), (0.25, "\u03bcm"), (0.25, "\u00b5m")])
def test_ome_pixel_sizes_in_other_units(tmp_path, size, unit):
    path = tmp_path / "tile.ome.tif"
    tifffile.imwrite(path, np.zeros((32, 32, 3), np.uint8), photometric="rgb",
                     metadata={"axes": "YXS", "PhysicalSizeX": size, "PhysicalSizeXUnit": unit,
                               "PhysicalSizeY": size, "PhysicalSizeYUnit": unit})
    assert file_pixel_size_um(path) == pytest.approx(0.25)


def test_an_imagej_calibration_in_microns(tmp_path):
    path = tmp_path / "fiji.tif"
    tifffile.imwrite(path, np.zeros((32, 32), np.uint16), imagej=True, resolution=(1 / 0.325, 1 / 0.325),
                     metadata={"unit": "um"})
    assert file_pixel_size_um(path) == pytest.approx(0.325)
    assert tiff_pixel_size_um(path)[1] == "imagej"


def test_transparent_pixels_read_as_glass_not_black(tmp_path):
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[5:15, 5:15] = (120, 60, 160, 255)  # tissue, opaque
    rgba[5:15, 15:] = (120, 60, 160, 128)  # half transparent
    Image.fromarray(rgba).save(tmp_path / "crop.png")
    pixels = read_image(tmp_path / "crop.png")
    assert pixels.shape == (20, 20, 3)
    assert (pixels[0, 0] == 255).all() and tuple(pixels[10, 10]) == (120, 60, 160)
    assert tuple(pixels[10, 17]) == (187, 157, 207)  # over white, half and half (rounded)


def test_indexed_and_one_bit_masks_are_label_maps(tmp_path):
    classes = np.zeros((16, 24), np.uint8)
    classes[2:6, 2:6], classes[8:12, 10:20] = 1, 3
    indexed = Image.fromarray(classes, mode="P")
    indexed.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    indexed.save(tmp_path / "indexed.png")
    assert np.array_equal(read_label_map(tmp_path / "indexed.png"), classes)
    Image.fromarray(classes > 0).convert("1").save(tmp_path / "mask.png")
    one_bit = read_label_map(tmp_path / "mask.png")
    assert one_bit.dtype == np.uint8 and np.array_equal(one_bit, (classes > 0).astype(np.uint8))


def test_a_16_bit_colour_png_keeps_its_16_bits(tmp_path):
    import imagecodecs

    rgb = np.zeros((8, 8, 3), np.uint16)
    rgb[0, :4, 0] = [7, 1007, 2007, 3007]
    (tmp_path / "camera.png").write_bytes(imagecodecs.png_encode(rgb))
    pixels = read_image(tmp_path / "camera.png")
    assert pixels.dtype == np.uint16 and pixels[0, :4, 0].tolist() == [7, 1007, 2007, 3007]


def _cmyk(rgb: np.ndarray) -> np.ndarray:
    """RGB as the four inks a print workflow stores (photometric 'separated'): black pulled out."""
    ink = 255 - rgb.astype(np.int32)
    black = ink.min(-1, keepdims=True)
    cmy = np.where(black < 255, (ink - black) * 255 // np.maximum(255 - black, 1), 0)
    return np.concatenate([cmy, black], -1).astype(np.uint8)


def test_cmyk_and_min_is_white_tiffs_read_as_they_look(tmp_path, real_512):
    """A CMYK TIFF had been read as RGBA (inks taken for light, the black ink for alpha) and a
    MinIsWhite one (0 is white: scanners, ImageJ's inverting LUT) as its negative; both now read
    as they look, eagerly and lazily (every pyramid level); label maps keep their stored values."""
    from napari_medseg.io.lazy import open_tiff_lazy

    gray = real_512.mean(-1).astype(np.uint8)
    tifffile.imwrite(tmp_path / "print.tif", _cmyk(real_512), photometric="separated")
    tifffile.imwrite(tmp_path / "scan.tif", 255 - gray, photometric="miniswhite")
    assert np.abs(read_image(tmp_path / "print.tif").astype(int) - real_512).max() <= 1  # integer ink rounding
    assert np.array_equal(read_image(tmp_path / "scan.tif"), gray)
    for name, pixels, kind in (("print_pyramid.tif", _cmyk(real_512), "separated"),
                               ("scan_pyramid.tif", 255 - gray, "miniswhite")):
        with tifffile.TiffWriter(tmp_path / name) as tw:
            tw.write(pixels, photometric=kind, tile=(128, 128), subifds=1)
            tw.write(pixels[::2, ::2], photometric=kind, tile=(128, 128), subfiletype=1)
        levels = open_tiff_lazy(tmp_path / name)
        seen = real_512 if kind == "separated" else gray
        for level, step in zip(levels, (1, 2)):
            assert level.shape == seen[::step, ::step].shape
            assert np.abs(np.asarray(level).astype(int) - seen[::step, ::step]).max() <= 1
    mask = np.zeros((16, 16), np.uint8)
    mask[4:8, 4:8] = 255
    tifffile.imwrite(tmp_path / "mask.tif", mask, photometric="miniswhite")  # ImageJ's binary mask
    assert np.array_equal(read_label_map(tmp_path / "mask.tif") > 0, mask > 0)


def test_a_camera_jpeg_reads_upright_as_viewers_show_it(tmp_path, real_512):
    """A photo through the microscope stored sideways with an EXIF orientation (6: turn 90°
    clockwise) reads as every viewer shows it; its PNG mask with the same tag turns with it."""
    image = real_512[:200, :300]
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(image).save(tmp_path / "photo.jpg", quality=95, exif=exif)
    pixels = read_image(tmp_path / "photo.jpg")
    upright = np.rot90(image, -1)
    assert pixels.shape == upright.shape == (300, 200, 3)
    assert np.abs(pixels.astype(int) - upright).mean() < 3  # JPEG's loss only
    mask = np.zeros((200, 300), np.uint8)
    mask[10:20, 250:290] = 2
    Image.fromarray(mask).save(tmp_path / "photo_mask.png", exif=exif)
    assert np.array_equal(read_label_map(tmp_path / "photo_mask.png"), np.rot90(mask, -1))


@pytest.mark.parametrize("mpp, expected", [("0.2500", 0.25), ("0,2500", 0.25), ("n/a", None), ("", None)])
def test_an_aperio_mpp_in_a_comma_locale_or_unreadable(tmp_path, mpp, expected):
    """'MPP = 0,2500' (a scanner set to a comma locale) had raised a ValueError traceback in
    medseg predict and the napari reader; it is 0.25, and an unreadable MPP is an unknown size."""
    path = tmp_path / "scan.svs"
    description = f"Aperio Image Library v12.0.15\r\n512x512 [0,0 512x512] (256x256) JPEG/RGB Q=70|AppMag = 40|MPP = {mpp}"
    tifffile.imwrite(path, np.full((512, 512, 3), 200, np.uint8), tile=(256, 256), description=description,
                     photometric="rgb")
    size, vendor, _ = tiff_pixel_size_um(path)
    assert vendor == "aperio" and size == (pytest.approx(expected) if expected else None)
    assert open_slide(path).pixel_size_um == (pytest.approx(expected) if expected else None)
