"""Single images and label maps: reading, the rules for odd pixel types, atomic writes.

Rules for what a reader hands to a model, one rule for eager and lazy arrays (``plane_layout``
decides from shape and dtype alone; ``validate_image_array`` applies it to a numpy array):

* a 2-D array is a gray image; ``(H, W, 3)`` is RGB; ``(H, W, 4)`` is RGBA and the
  alpha channel is dropped; gray + alpha (a PNG's "LA", a TIFF's gray with an alpha extra
  sample) is gray; ``(3|4, H, W)`` (channel-first, as in many OME-TIFFs)
  is moved to channel-last; singleton axes (OME's T, Z, C of size 1) are squeezed.
* anything else (z-stacks, time series, 4-D/5-D data, more than 4 channels) is
  refused with a message naming the shape, rather than guessed at.
* the dtype is kept on read; ``to_rgb_float`` maps it to ``[0, 1]``: uint8 by /255,
  other integers (e.g. 12/16-bit microscopy) and floats outside ``[0, 1]`` by the
  image's own 0.5-99.5 percentiles (computed once per image), floats already in
  ``[0, 1]`` as they are. NaN is refused.
* a TIFF's stored samples are read as they look (``InkLook``): CMYK becomes RGB, MinIsWhite
  gray is inverted, indexed colour becomes its palette's colours; label maps keep their stored values.
* a TIFF's separate channels (its C axis) are RGB only when there are three: a 4th is a stain,
  not alpha, and 2 or 4+ channels are refused, the message saying how many.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import MedsegError
from .outputs import temp_path, write_error

BIGTIFF_SUFFIXES = (".btf", ".tf8", ".tf2")  # BigTIFF as Bio-Formats and QuPath name it: read as .tif
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg") + BIGTIFF_SUFFIXES
LABEL_SUFFIXES = (".tif", ".tiff", ".png")
# file names that say a label map, not an image ('b_mask.png' beside 'b.png'): opened as labels, not segmented
LABEL_NAME_ENDINGS = ("_labels", "_label", "_mask", "_masks", "_instances")


class ImageReadError(MedsegError, ValueError):
    """An image or label file could not be read or has a shape/dtype we do not accept."""


class LabelWriteError(MedsegError, ValueError):
    """An array cannot be written as a label map (not 2-D, not integer, or negative)."""


def image_suffix(path: str | os.PathLike) -> str:
    """Lower-case suffix; a BigTIFF's ``.btf``, ``.tf8`` or ``.tf2`` as ``.tif`` (``x.ome.tif``'s is ``.tif``)."""
    suffix = Path(path).suffix.lower()
    return ".tif" if suffix in BIGTIFF_SUFFIXES else suffix


def file_stem(path: str | os.PathLike) -> str:
    """Name without extension; ``x.ome.tif`` and ``x.ome.tiff`` give ``x`` (``Path.stem`` gives ``x.ome``)."""
    name = Path(path).name
    for suffix in (".ome.tif", ".ome.tiff"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


@contextmanager
def tifffile_quiet():
    """tifffile's log lines about a broken header ("incorrect StripOffsets count" ...) silenced:
    the ``ImageReadError`` raised for the file says what is wrong, once, naming it."""
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


@dataclass(frozen=True)
class InkLook:
    """How a TIFF's stored samples become what the eye sees (dark is low, colour is RGB):
    ``min_is_white`` gray is inverted (scanners and ImageJ's inverting LUT store 0 as white),
    ``cmyk`` inks (photometric 'separated') become RGB. Label maps are never converted: their
    values are classes, not light."""

    min_is_white: bool = False
    cmyk: bool = False
    white: float = 255.0  # the stored value of full ink / full white: 2**bits - 1
    # an indexed-colour image's colours, ``[index] -> RGB`` (ImageJ's "8-bit Color", an editor's
    # indexed save): its stored values are no intensities. A display LUT over intensities (ImageJ's
    # green or fire LUT on a fluorescence image) is no palette: those values are the data.
    palette: np.ndarray | None = field(default=None, compare=False)

    @classmethod
    def of(cls, page) -> "InkLook":
        import tifffile

        photometric, bits = page.photometric, int(page.bitspersample or 8)
        integer = np.dtype(page.dtype).kind in "ui"
        white = float(2 ** bits - 1) if integer else 1.0
        if photometric == tifffile.PHOTOMETRIC.PALETTE and page.samplesperpixel == 1 and integer:
            colormap = getattr(page, "colormap", None)
            if colormap is not None and not _is_intensity_lut(np.asarray(colormap)):
                return cls(palette=_palette_colors(np.asarray(colormap)))
        if photometric == tifffile.PHOTOMETRIC.MINISWHITE and page.samplesperpixel == 1 and page.dtype != bool:
            return cls(min_is_white=True, white=white)
        if photometric == tifffile.PHOTOMETRIC.SEPARATED and page.samplesperpixel >= 4:
            inkset = page.tags.get("InkSet")
            if inkset is None or inkset.value == 1:  # 1: CMYK (the default); 2: other inks, left as stored
                return cls(cmyk=True, white=white)
        return cls()

    @property
    def changes(self) -> bool:
        return self.min_is_white or self.cmyk or self.palette is not None

    def convert(self, pixels: np.ndarray) -> np.ndarray:
        """``pixels`` (samples on the last axis for CMYK) as seen; the dtype kept, but for a
        palette's indices, which become its RGB colours (a last axis of 3)."""
        if self.palette is not None:
            return self.palette[np.minimum(pixels, len(self.palette) - 1)]
        if self.min_is_white:
            return (self.white - pixels).astype(pixels.dtype)
        if self.cmyk:  # R = (1 - C)(1 - K), in the stored range
            inks = pixels[..., :4].astype(np.float32)
            rgb = (self.white - inks[..., :3]) * (self.white - inks[..., 3:4]) / self.white
            return np.rint(rgb).astype(pixels.dtype) if pixels.dtype.kind in "ui" else rgb.astype(pixels.dtype)
        return pixels


def _is_intensity_lut(colormap: np.ndarray) -> bool:
    """A TIFF colormap ``(3, N)`` that only colours intensities: each of red, green and blue
    rises (or falls) steadily with the index, as a display LUT does; a palette of colours does not."""
    steps = np.diff(colormap.astype(np.int64), axis=1)
    return bool(all((row >= 0).all() or (row <= 0).all() for row in steps))


def _palette_colors(colormap: np.ndarray) -> np.ndarray:
    """``(N, 3)`` colours of a TIFF colormap (16-bit, ``(3, N)``): 8-bit where its values are 8-bit
    ones scaled as writers scale them (by 257: ImageJ, tifffile; by 256: Pillow)."""
    colors = colormap.T.astype(np.uint16)
    for scale in (257, 256):
        if not (colors % scale).any():
            return (colors // scale).astype(np.uint8)
    return colors


def _read_raw(path: Path, palette_indices: bool = False) -> tuple[np.ndarray, str | None]:
    """The file's pixels as seen (MinIsWhite and CMYK TIFFs converted, ``InkLook``), and a
    TIFF's axes (``None`` for PNG and JPEG). A palette image's colours, or with ``palette_indices``
    its indices (an indexed label mask's classes), and then a TIFF's values as stored."""
    suffix = image_suffix(path)
    if suffix not in IMAGE_SUFFIXES:
        raise ImageReadError(
            f"Cannot read '{path.name}': unknown extension '{suffix or '(none)'}'. "
            f"Supported: {', '.join(IMAGE_SUFFIXES)}."
        )
    if not path.is_file():
        raise ImageReadError(f"Cannot read '{path}': no such file.")
    if path.stat().st_size == 0:
        raise ImageReadError(f"Cannot read '{path.name}': the file is empty (0 bytes).")
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            from .lazy import main_series_index

            with tifffile_quiet(), tifffile.TiffFile(path) as tif:
                # the series that holds the image (a macro or label image may come first), as the
                # file describes it (its axes: a 3-plane z-stack is not RGB); level 0 is full
                # resolution for pyramidal files
                series = tif.series[main_series_index(tif)]
                check_tiff_data(series, path)
                check_gray_samples(series.keyframe, series.axes, f"'{path.name}'")  # before decoding it all
                pixels, axes, look = np.asarray(series.asarray()), series.axes, InkLook.of(series.keyframe)
                if gray_with_alpha(series.keyframe, axes):  # as a gray + alpha PNG reads: its gray
                    pixels, axes = pixels[..., 0], axes[:-1]
                if look.changes and not palette_indices and (look.min_is_white or axes.endswith("S")):
                    pixels = look.convert(pixels)
                elif look.palette is not None and not palette_indices:
                    pixels, axes = look.convert(pixels), axes + "S"  # indices -> their colours
                return pixels, axes
        if suffix == ".png" and _png_bit_depth(path) == 16:
            # Pillow decodes 16-bit colour PNGs to 8 bits (12-bit camera data turns nearly black)
            import imagecodecs

            pixels = np.asarray(imagecodecs.png_decode(path.read_bytes()))
            return (pixels[..., 0] if pixels.ndim == 3 and pixels.shape[-1] == 2 else pixels), None  # gray + alpha: gray
        from PIL import Image

        from PIL import ImageOps

        with Image.open(path) as im:
            im.load()  # forces decoding, so truncated files fail here
            # upright as every viewer shows it (a camera's EXIF orientation), the mask of an image too
            im = ImageOps.exif_transpose(im)
            if im.mode == "P" and palette_indices:
                pass
            elif im.mode in ("P", "PA"):
                im = im.convert("RGBA" if "transparency" in im.info or im.mode == "PA" else "RGB")
            elif im.mode in ("LA", "La"):
                im = im.convert("L")  # gray + alpha: drop alpha as for RGBA, else (H, W, 2) is refused
            elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("RGB")
            return np.asarray(im), None
    except ImageReadError:
        raise
    except Exception as exc:  # tifffile/PIL raise many types for broken files
        why = str(exc).replace(str(path.parent) + os.sep, "")  # the file's name is said; its folder (a server's temp) not
        raise ImageReadError(
            f"Cannot read '{path.name}': the file is corrupt, truncated or not a "
            f"{suffix.lstrip('.').upper()} file ({type(exc).__name__}: {why})."
        ) from exc


def gray_with_alpha(page, axes: str) -> bool:
    """A TIFF page of gray samples and an alpha sample (Pillow's "LA", an editor's gray with
    transparency): read as its gray, as a gray + alpha PNG is. The alpha of a gray image is no
    stain; two samples of which the 2nd is no alpha are two channels (refused, counted)."""
    import tifffile

    extras = tuple(getattr(page, "extrasamples", ()) or ())
    return (axes.endswith("S") and page.samplesperpixel == 2 and len(extras) == 1
            and page.photometric in (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.MINISWHITE)
            and extras[0] in (tifffile.EXTRASAMPLE.ASSOCALPHA, tifffile.EXTRASAMPLE.UNASSALPHA))


def check_gray_samples(page, axes: str, name: str) -> None:
    """Refuse a TIFF page of gray samples (MinIsBlack / MinIsWhite) with more than three per
    pixel: separate channels stored side by side (fluorescence: DAPI, FITC, TRITC, Cy5), which
    the layout rules would take for RGBA (every pixel whitened by its 4th stain as alpha: 0
    nuclei, no word). Three are read as RGB, as three separate channels (a C axis) are."""
    import tifffile

    gray = page.photometric in (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.MINISWHITE)
    if axes.endswith("S") and gray and page.samplesperpixel > 3:
        raise ImageReadError(
            f"{name}: {page.samplesperpixel} gray channels per pixel (e.g. fluorescence stains), not RGB(A): "
            "save the nuclear channel (e.g. DAPI) as a gray image, or three channels as an RGB image.")


def _png_bit_depth(path: Path) -> int | None:
    """A PNG's bits per sample, from its header (IHDR), or ``None`` if it is not a PNG."""
    with open(path, "rb") as f:
        head = f.read(26)
    return head[24] if len(head) == 26 and head[:8] == b"\x89PNG\r\n\x1a\n" else None


def check_tiff_data(series, path: Path) -> None:
    """Refuse a TIFF whose header promises image data that the file lacks: fewer strips or tiles
    than its image size needs, or strips or tiles past the end of the file (a cut-off copy or
    download). tifffile would fill the missing parts with zeros (a silently wrong image) or fail
    deep inside a lazy read; a memory map of such a file would crash with SIGBUS."""
    size = path.stat().st_size
    for level in series.levels:
        for page in level.pages:
            if page is None:
                continue
            offsets = np.asarray(page.dataoffsets, np.int64)
            expected = int(np.prod(getattr(page, "keyframe", page).chunked))
            end = int((offsets + np.asarray(page.databytecounts, np.int64)).max(initial=0))
            if len(offsets) != expected:
                found = (f" or wrongly written: its header describes {level.shape} pixels in {expected} strips "
                         f"or tiles but lists {len(offsets)}")
            elif end > size:
                found = f": its header places image data up to byte {end:,} but the file ends at byte {size:,}"
            else:
                continue
            raise ImageReadError(f"Cannot read '{path.name}': the file is corrupt, truncated{found}. "
                                 "Copy or export it again from the original.")


def _plane_index(shape: tuple[int, ...]) -> tuple[tuple, tuple[int, ...]]:
    """An index that drops the singleton axes outside the image plane (OME's T, Z, C of size 1)
    and a trailing channel of 1, and the shape it leaves.

    Not ``np.squeeze``: that also drops a 1-pixel-high or -wide image's own rows or columns,
    turning a (1, W, 3) RGB strip into a (W, 3) gray image.
    """
    dropped: list[int] = []
    if len(shape) > 2:
        keep = 3 if shape[-1] in (1, 3, 4) else 2  # (H, W, C) channel-last, else (..., H, W)
        dropped = [i for i in range(len(shape) - keep) if shape[i] == 1]
        if len(shape) - len(dropped) == 3 and shape[-1] == 1:
            dropped.append(len(shape) - 1)
    index = tuple(0 if i in dropped else slice(None) for i in range(len(shape)))
    return index, tuple(n for i, n in enumerate(shape) if i not in dropped)


def _channels_axis(axes: str | None, index: tuple, plane: tuple[int, ...], channel_first: bool) -> str | None:
    """The TIFF axis letter (``C`` or ``S``) of a 3-D plane's channels, where the axes are known."""
    if axes is None or len(axes) != len(index) or len(plane) != 3:
        return None
    kept = [axis for axis, i in zip(axes, index) if not isinstance(i, int)]
    return kept[0] if channel_first else kept[-1]


def _channels_hint(axes: str | None, shape: tuple[int, ...], stray_axes: bool) -> str:
    """What to do with a TIFF of separate channels (its C axis) that is no RGB image: say how many."""
    if axes is None or stray_axes or len(axes) != len(shape):
        return ""
    channels = int(np.prod([n for a, n in zip(axes, shape) if a == "C"]))
    if channels in (1, 3):
        return ""
    return (f" It holds {channels} separate channels (axis C, e.g. fluorescence stains), not RGB(A): save the "
            "nuclear channel (e.g. DAPI) as a gray image, or three channels as an RGB image.")


@dataclass(frozen=True)
class PlaneLayout:
    """Where the 2-D image sits in an array, decided from its shape and dtype alone (no pixel is
    read, so it serves lazy arrays too): see ``plane_layout``."""

    index: tuple  # selects the plane: 0 on each dropped singleton axis, a full slice elsewhere
    channel_first: bool  # the selected plane is (C, H, W)
    height: int
    width: int
    channels: int  # 1 (gray), 3 (RGB) or 4 (RGBA: readers of pixels drop the alpha, ``without_alpha``)

    def select(self, array):
        """The plane of ``array`` (numpy or lazy), its channels where the array keeps them."""
        return array[self.index] if any(isinstance(i, int) for i in self.index) else array

    def to_channel_last(self, array):
        """The plane of ``array`` as ``(H, W)`` or ``(H, W, C)``; a view, lazy for dask arrays."""
        plane = self.select(array)
        return plane.transpose(1, 2, 0) if self.channel_first else plane


def plane_layout(shape, dtype, name: str = "image", axes: str | None = None) -> PlaneLayout:
    """The layout of a 2-D gray, RGB or RGBA image in an array of ``shape`` and ``dtype``, per the
    module rules, or an ``ImageReadError`` naming ``name`` and the shape.

    ``axes`` (a TIFF's, e.g. ``"TZCYX"``) when known: an axis other than Y, X and samples or
    channels must then have size 1, so that a 3-plane z-stack is not taken for RGB.
    """
    try:
        shape, dtype = tuple(int(n) for n in shape), np.dtype(dtype)
    except TypeError:  # a torch tensor's dtype: 'Cannot interpret torch.uint8 as a data type' had been all
        raise ImageReadError(f"{name}: pixels of type {dtype} are not a NumPy array's; pass a NumPy array (from a "
                             "torch tensor: tensor.cpu().numpy(), with channels last).") from None
    if dtype == bool or not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise ImageReadError(f"{name}: unsupported pixel type {dtype}; expected integer or float pixels.")
    index, plane = _plane_index(shape)
    channel_first = len(plane) == 3 and plane[0] in (3, 4) and plane[-1] not in (3, 4)
    stray_axes = axes is not None and any(a not in "YXSC" and n != 1 for a, n in zip(axes, shape))
    channels_axis = _channels_axis(axes, index, plane, channel_first)
    # a TIFF's C axis holds channels stored apart (fluorescence: DAPI, FITC, ...); a 4th is no
    # alpha (an RGBA image's samples are its S axis) and would turn every pixel towards white
    separate_fourth = channels_axis == "C" and (plane[0] if channel_first else plane[-1]) == 4
    if stray_axes or separate_fourth or not (
            len(plane) == 2 or (len(plane) == 3 and (plane[-1] in (3, 4) or channel_first))):
        described = f"shape {shape}" + (f" (axes '{axes}')" if axes is not None else "")
        raise ImageReadError(
            f"{name}: {described} is not a 2-D gray, RGB or RGBA image. "
            "Stacks, time series and multi-channel data other than RGB(A) are not supported; "
            "save one 2-D plane (or an RGB image) per file." + _channels_hint(axes, shape, stray_axes)
        )
    height, width = plane[1:] if channel_first else plane[:2]
    if height == 0 or width == 0:
        raise ImageReadError(f"{name}: the image is empty (shape {shape}).")
    channels = 1 if len(plane) == 2 else plane[0] if channel_first else plane[-1]
    return PlaneLayout(index, channel_first, height, width, channels)


def without_alpha(pixels: np.ndarray) -> np.ndarray:
    """RGBA -> RGB over white: alpha carries no stain information, but a transparent area (a crop's
    border, a region never scanned) is glass, not the black a tissue finder and a model would take
    for dark tissue. Alpha the same everywhere (opaque, or a writer's unset 0) marks no area and is
    dropped (a view), as is float alpha, whose range is not known. Other pixels as they are."""
    if not (pixels.ndim == 3 and pixels.shape[-1] == 4):
        return pixels
    rgb, alpha = pixels[..., :3], pixels[..., 3:4]
    if not np.issubdtype(pixels.dtype, np.integer) or alpha.size == 0 or (alpha == alpha.flat[0]).all():
        return rgb
    full = int(np.iinfo(pixels.dtype).max)
    alpha = alpha.astype(np.uint64)
    return ((rgb * alpha + full * (full - alpha) + full // 2) // full).astype(pixels.dtype)


def validate_image_array(array: np.ndarray, name: str = "image", axes: str | None = None) -> np.ndarray:
    """Bring an array to ``(H, W)`` or ``(H, W, 3)`` per the module rules, or raise. ``axes``: a
    TIFF's, when known (see ``plane_layout``)."""
    array = np.asarray(array)
    array = without_alpha(plane_layout(array.shape, array.dtype, name, axes).to_channel_last(array))
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise ImageReadError(f"{name}: the image contains NaN or infinite pixels.")
    return array


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a TIFF (incl. OME/multi-page with one image), PNG or JPEG as ``(H, W)`` or ``(H, W, 3)``."""
    path = Path(path)
    pixels, axes = _read_raw(path)
    return validate_image_array(pixels, name=f"'{path.name}'", axes=axes)


def intensity_range(image, sample_rows: int = 2048) -> tuple[float, float] | None:
    """The ``(lo, hi)`` that ``to_rgb_float`` maps to ``[0, 1]``, or None for identity/255.

    uint8 is fixed (/255); floats already in ``[0, 1]`` are kept; other integers and floats
    outside ``[0, 1]`` get their 0.5-99.5 percentiles. Computed once per image, never per tile.
    An image taller than ``sample_rows`` (e.g. a lazy whole-slide array) is sampled at evenly
    spaced rows, so the statistics never need the whole image in memory.
    """
    dtype = np.dtype(image.dtype)
    if dtype == np.uint8:
        return None
    height = image.shape[0]
    if height > sample_rows:
        rows = np.linspace(0, height - 1, sample_rows).astype(int)
        sample = np.concatenate([np.asarray(image[r:r + 1]) for r in rows])
    else:
        sample = np.asarray(image)
    sample = sample.astype(np.float32)
    if np.issubdtype(dtype, np.floating) and not np.isfinite(sample).all():
        raise ImageReadError("image: the image contains NaN or infinite pixels.")
    lo, hi = float(sample.min()), float(sample.max())
    if np.issubdtype(dtype, np.integer) or lo < 0.0 or hi > 1.0:
        lo, hi = (float(v) for v in np.percentile(sample, (0.5, 99.5)))
        return lo, (hi if hi > lo else lo + 1.0)
    return 0.0, 1.0


def to_rgb_float(image: np.ndarray, channels: int = 3,
                 value_range: tuple[float, float] | None | str = "auto") -> np.ndarray:
    """``(H, W[, 3])`` image of any supported dtype -> float32 ``(H, W, channels)`` in [0, 1].

    Gray is replicated to RGB for 3-channel models; RGB is averaged for 1-channel models.
    ``value_range`` (from ``intensity_range``) lets a caller reuse one image's statistics for
    each of its tiles or strips; ``"auto"`` computes them from ``image`` itself.
    """
    image = validate_image_array(image)
    if isinstance(value_range, str):
        value_range = intensity_range(image)
    return np.ascontiguousarray(scale_to_unit(image, channels, value_range), dtype=np.float32)


def scale_to_unit(pixels: np.ndarray, channels: int, value_range: tuple[float, float] | None) -> np.ndarray:
    """Already-validated ``(..., [C])`` pixels -> float32 ``(..., channels)`` in ``[0, 1]``.

    The conversion behind ``to_rgb_float``, without its checks, for callers that validated
    the image once and convert it piece by piece (the tiled engine).
    """
    if pixels.dtype == np.uint8:
        out = pixels.astype(np.float32) / np.float32(255)
    else:
        out = pixels.astype(np.float32)
        if value_range is not None and value_range != (0.0, 1.0):
            lo, hi = value_range
            out = np.clip((out - lo) / (hi - lo), 0.0, 1.0)
    if out.ndim == 2:
        out = out[..., None]
    if out.shape[-1] != channels:
        out = np.repeat(out, channels, axis=-1) if out.shape[-1] == 1 else out.mean(-1, keepdims=True)
    return out


def read_label_map(path: str | os.PathLike) -> np.ndarray:
    """Read a class or instance map (TIFF/PNG) as a 2-D integer array."""
    path = Path(path)
    if image_suffix(path) not in LABEL_SUFFIXES:
        raise ImageReadError(f"Cannot read labels '{path.name}': use .tif or .png for label maps.")
    raw, _ = _read_raw(path, palette_indices=True)
    labels = raw[_plane_index(raw.shape)[0]]
    if labels.dtype == bool:  # a 1-bit mask: background and one class
        labels = labels.astype(np.uint8)
    if labels.ndim != 2:
        raise ImageReadError(f"Labels '{path.name}': expected a 2-D label map, got shape {labels.shape}.")
    if not np.issubdtype(labels.dtype, np.integer):
        if np.issubdtype(labels.dtype, np.floating) and np.all(np.mod(labels, 1) == 0):
            labels = labels.astype(np.int64)
        else:
            raise ImageReadError(f"Labels '{path.name}': label maps need integer values, got {labels.dtype}.")
    if labels.size and labels.min() < 0:
        raise ImageReadError(f"Labels '{path.name}': negative label values are not allowed.")
    return labels


# what a label map is (kind, classes, colours, origin), kept with it: the JSON description of a
# label TIFF ({"napari-medseg": {...}}), a slide run's OME Description and zarr attributes
LABEL_RECORD_KEY = "napari-medseg"


RECORDED_VOTES_MAX = 100_000  # a nucleus-class table up to this many ids goes along (a list in JSON)


def label_record(kind: str, classes: list[str] | None = None, colors=None, origin: tuple[int, int] | None = None,
                 instance_classes=None) -> dict:
    """What a written result map is, for ``write_label_map(record=)``: ``kind`` ("classes" or
    "instances"), the model's class names and colours, a region's ``(y, x)`` origin in its image
    and an instance map's ``instance_classes`` (``[id] -> class``), so napari reopens it named,
    coloured and in place."""
    record: dict = {"kind": kind}
    if classes:
        record["classes"] = list(classes)
        if colors is not None and len(colors) == len(classes):
            record["colors"] = json.loads(json.dumps(list(colors), default=lambda v: v.tolist()))  # numpy too
    if origin and any(origin):
        record["origin"] = [int(origin[0]), int(origin[1])]
    if instance_classes is not None and len(instance_classes) <= RECORDED_VOTES_MAX:
        record["instance_classes"] = np.asarray(instance_classes).astype(int).tolist()
    return record


def read_label_record(path: str | os.PathLike) -> dict | None:
    """What ``write_label_map`` recorded about a label TIFF (``kind``, ``classes``, ``colors``,
    ``origin``...), or ``None`` for any other file."""
    if image_suffix(Path(path)) not in (".tif", ".tiff"):
        return None
    import tifffile

    try:
        with tifffile_quiet(), tifffile.TiffFile(path) as tif:
            description = tif.pages[0].description or ""
        record = json.loads(description).get(LABEL_RECORD_KEY) if description.startswith("{") else None
    except (OSError, ValueError, AttributeError, IndexError, tifffile.TiffFileError):
        return None
    return record if isinstance(record, dict) else None


def smallest_label_dtype(labels: np.ndarray) -> np.dtype:
    top = int(labels.max()) if labels.size else 0
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: no half-written file is ever visible.
    The temp file goes on every exit path; a write error names ``path``, not the temp file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # its error names the folder it could not make
    # A unique name that ``write`` creates itself, so the file gets the usual umask permissions
    # (mkstemp's file is 0600, which would make every written label map private to its owner).
    tmp = temp_path(path)
    try:
        mode = _new_file_mode(tmp)
        write(tmp)
        # some writers make their file private whatever the umask (safetensors: 0600): the file
        # the user gets has the mode any new file of theirs has (0644 under the usual umask)
        if mode is not None and tmp.exists() and (tmp.stat().st_mode & 0o777) != mode:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as exc:  # Ctrl-C and SIGTERM (cli.Terminated) included
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, MedsegError):
            raise write_error(path, exc) from None
        raise


def _new_file_mode(tmp: Path) -> int | None:
    """The permission bits a new file gets in ``tmp``'s folder (the umask, a default ACL): those
    of ``tmp``, made and removed here (reading the umask by setting it is not thread-safe)."""
    if os.name != "posix":
        return None
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        return os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
        os.unlink(tmp)


def write_label_map(path: str | os.PathLike, labels: np.ndarray, pixel_size_um: float | None = None,
                    record: dict | None = None) -> Path:
    """Write a label map as a zlib-compressed TIFF, in the smallest unsigned dtype, atomically;
    ``pixel_size_um`` in its resolution tags (so it opens on its image, at the same scale), and
    ``record`` (what the map is: kind, classes, colours, origin) as JSON in its description, which
    ``read_label_record`` gives back."""
    import tifffile

    path = Path(path)
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise LabelWriteError(
            f"Cannot write labels '{path.name}': expected a 2-D integer array, got {labels.dtype} {labels.shape}.")
    if labels.size and labels.min() < 0:
        # The cast to an unsigned dtype below would silently wrap -1 to 255/65535.
        raise LabelWriteError(f"Cannot write labels '{path.name}': negative label values are not allowed.")
    data = labels.astype(smallest_label_dtype(labels), copy=False)
    big = data.shape[0] * data.shape[1] > 4096 * 4096
    atomic_write(
        path,
        lambda tmp: tifffile.imwrite(
            tmp, data, compression="zlib", tile=(512, 512) if big else None, bigtiff=big, photometric="minisblack",
            **({"resolution": (1e4 / pixel_size_um, 1e4 / pixel_size_um), "resolutionunit": "CENTIMETER"}
               if pixel_size_um else {}),
            **({"description": json.dumps({LABEL_RECORD_KEY: record}), "metadata": None} if record else {}),
        ),
    )
    return path
