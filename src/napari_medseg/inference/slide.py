"""``medseg predict SLIDE``: a region (or the whole slide) segmented at flat memory, its nuclei
cut block by block, and the results written for QuPath and napari.

One step generator over the phases of a run on one progress scale: the model over tissue blocks
(``regions``), the class map cut to the region's polygon and counted, nuclei stitched block by
block (``nuclei.stitch``, with the GeoJSON outlines and CSV rows of each block written as it is
done), then the label pyramids (zarr, OME-TIFF). Every phase steps block by block or tile row by
tile row, so a cancel lands within about a second; the files are renamed into place only when
the whole run is done (``SlideResultFiles``), so a cancelled run leaves none.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..colors import class_colors
from ..errors import MedsegError
from ..io.images import file_stem
from ..io.outputs import write_error
from ..io.slides import SlideError
from ..io.slide_outputs import (CSVStream, GeoJSONStream, SlideResultFiles, create_result_store, iter_build_pyramid,
                                iter_write_pyramid_tiff, pyramid_shapes, pyramid_steps, tiff_steps)
from ..nuclei.measure import UNCLASSIFIED, object_table
from ..nuclei.stitch import BLOCK as NUCLEI_BLOCK
from ..nuclei.stitch import HALO as NUCLEI_HALO
from ..nuclei.stitch import NucleiBlock, block_grid, iter_stitched_instances
from ..nuclei.watershed import InstanceSettings
from ..steps import offset_steps, run_steps
from .regions import (BLOCK, HALO, PROGRESS_PER_BLOCK, Region, RegionError, TissueMask, TissueSettings, find_tissue,
                      iter_segment_region, region_blocks, whole_slide)
from .postprocess import PostprocessSettings
from .rescale import settings_at_image_scale
from .settings import TileSettings
from .segmenter import GRAY_NOTE
from .source import DARK_NOTE


@dataclass
class SlideResult:
    """What a slide run made: the region, how much of it was tissue, the nuclei and the class
    map's pixels per class (of the region, or of its polygon), the files."""

    region: Region
    tissue_fraction: float
    segmented_px: int
    nuclei: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    class_px: dict[str, int] = field(default_factory=dict)
    region_px: int = 0  # level-0 px of the region (inside its polygon, when it has one)
    files: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # per phase: model, classes, nuclei, pyramids
    notes: list[str] = field(default_factory=list)  # what the user should know (``source.DARK_NOTE``)


def iter_predict_slide(segmenter, slide, out_dir: str | os.PathLike, region: Region | None = None,
                       settings: TileSettings | None = None, instance_settings: InstanceSettings | None = None,
                       tissue_settings: TissueSettings | None = None, nuclei: bool = True, block: int = BLOCK,
                       nuclei_block: int = NUCLEI_BLOCK, postprocess: PostprocessSettings | None = None,
                       polygon: np.ndarray | None = None, flag: str = "out_dir"):
    """Generator: yields ``(done, total)``; returns a ``SlideResult``. Files go to ``out_dir``:
    ``<slide>.zarr`` (multiscale ``classes`` and ``instances``, aligned with the slide),
    ``<slide>_labels.ome.tif`` (class map), and with ``nuclei``: ``<slide>_instances.ome.tif``,
    ``<slide>_nuclei.geojson`` (QuPath, level-0 px) and ``<slide>_nuclei.csv`` (areas in µm²).

    ``polygon``: ``(N, 2)`` level-0 ``(y, x)`` vertices; the run covers their bounding box and its
    outside is background. A folder that already holds results of this slide is refused
    (``OutputFolderError``, naming ``flag``): results are never overwritten. ``slide``: an opened
    slide (``io.slides.open_slide``) or its path; ``region``: a ``Region`` or ``(x, y, width, height)``."""
    slide, region = _opened(slide), _as_region(region)
    region = (region or (_bounding_region(polygon) if polygon is not None else whole_slide(slide))).checked(slide.shape)
    files = SlideResultFiles(out_dir, file_stem(slide.path), flag)  # refused here, before any work
    tissue = _within(find_tissue(slide, tissue_settings), polygon)
    names = {"classes": "uint8", **({"instances": "int32"} if nuclei else {})}
    if nuclei and segmenter.has_distance_head:
        names["distance"] = "float16"
    maps = [name for name in ("classes", "instances") if name in names]
    result = SlideResult(region, tissue.fraction_in(region), 0)  # the region's share, not the slide's
    result.notes.extend(getattr(slide, "notes", []))  # a cut-off file's, said with the results
    if tissue.gray and _colour_model(segmenter):  # as an image run says it (the slide's blocks ran silent)
        result.notes.append(GRAY_NOTE)
    if tissue.dark_field and _colour_model(segmenter):
        result.notes.append(DARK_NOTE)
    try:
        store = create_result_store(files.temp("store"), slide.shape, names, block // 2, slide.pixel_size_um,
                                    _class_record(segmenter), shown_as=files.path("store"))
        phases = _phases(segmenter, slide, store, files, result, maps, tissue, polygon, block, nuclei_block,
                         settings, postprocess, instance_settings)
        yield from _run_phases(phases, result.seconds)
        result.files = files.commit()
    except BaseException as exc:  # cancelled (GeneratorExit) or failed: nothing half-made is left
        if isinstance(exc, OSError):
            _wait_for_store_writes()  # else a write still under way makes the removed store again
        files.abort()
        if isinstance(exc, OSError) and not isinstance(exc, MedsegError):  # a full disk, say: named, not bare
            raise write_error(Path(out_dir), exc) from None
        raise
    return result


def _wait_for_store_writes(timeout: float = 10.0) -> None:
    """Waits for the zarr writes still under way. Zarr writes a block's chunks concurrently on its
    own event loop, and the first that fails (a full disk) is raised while the others still run;
    one of those had made the store's folder again after the failed run removed it (2 runs in 6
    left a hidden ``.<slide>.zarr...part`` behind)."""
    import asyncio

    try:
        from zarr.core.sync import sync
    except ImportError:  # another zarr: nothing known to wait for
        return

    async def others_done() -> None:
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        if others:
            await asyncio.wait(others, timeout=timeout)

    try:
        sync(others_done(), timeout=timeout + 1)
    except Exception:  # waiting is a courtesy to the clean-up, never a new failure
        pass


def _opened(slide):
    """A path given from Python is opened here (it had failed with "'str' object has no attribute 'shape'")."""
    if isinstance(slide, (str, os.PathLike)):
        from ..io.slides import open_slide

        return open_slide(slide)
    if not hasattr(slide, "levels"):
        raise SlideError(f"predict_slide takes a slide opened with napari_medseg.io.slides.open_slide (or its "
                         f"path), got {type(slide).__name__}; for an image in memory use Segmenter.segment_nuclei.")
    return slide


def _as_region(region) -> Region | None:
    if region is None or isinstance(region, Region):
        return region
    try:
        return Region(*region)
    except TypeError:
        raise RegionError(f"A region is Region(x, y, width, height) or four numbers in level-0 px, got "
                          f"{region!r}.") from None


def predict_slide(segmenter, slide, out_dir, region: Region | None = None, progress=None, should_cancel=None,
                  **options) -> SlideResult:
    """``iter_predict_slide`` run to the end (the ``medseg predict SLIDE`` entry point)."""
    return run_steps(iter_predict_slide(segmenter, slide, out_dir, region, **options), progress, should_cancel)


def _phases(segmenter, slide, store, files, result, maps, tissue, polygon, block, nuclei_block, settings,
            postprocess, instance_settings) -> list[tuple[str, int, object]]:
    """The run as ``(name, steps, start())`` phases, each a step generator of known length."""
    region, size = result.region, slide.pixel_size_um
    distance = store["distance/0"] if "distance" in store else None
    scale = segmenter.scale_for(size)

    def segment():
        result.segmented_px = yield from iter_segment_region(segmenter, slide, region, store["classes/0"], distance,
                                                             settings, tissue, block, halo_in_slide_px(HALO, scale),
                                                             postprocess=postprocess)

    seg_steps = PROGRESS_PER_BLOCK * sum(tissue.any_in(*b) for b in region_blocks(region, block))
    phases = [("model", seg_steps, segment),
              ("classes", len(region_blocks(region, block)),
               lambda: _iter_cut_and_count(store, region, polygon, segmenter.classes, result, block))]
    if "instances" in maps:
        phases.append(("nuclei", len(block_grid(region.height, region.width, nuclei_block)),
                       lambda: _iter_nuclei(segmenter, slide, store, region, instance_settings, files, result,
                                            nuclei_block, halo_in_slide_px(NUCLEI_HALO, scale))))
    shapes, bounds = pyramid_shapes(slide.shape), (region.y, region.y + region.height, region.x,
                                                   region.x + region.width)  # outside: zeros, never read
    for name in maps:
        kind = f"{name}_tiff"
        phases.append(("pyramids", pyramid_steps(slide.shape, bounds=bounds),
                       lambda name=name: iter_build_pyramid(store[name], pixel_size_um=size, bounds=bounds)))
        phases.append(("pyramids", tiff_steps(shapes, store[f"{name}/0"].chunks[1]),
                       lambda name=name, kind=kind: iter_write_pyramid_tiff(
                           files.temp(kind), store[name], size, named=files.path(kind), bounds=bounds,
                           classes=_class_record(segmenter) if name == "classes" else None)))
    return phases


def halo_in_slide_px(halo: int, scale: float) -> int:
    """A halo of ``halo`` px at the model's pixel size, in slide px (``scale``: model px per slide
    px): wider on a slide finer than the model, whose nuclei span more of its pixels (a 60x image's
    nucleus is wider than 64 px), so a nucleus on a seam is still seen whole; never narrower."""
    return max(halo, math.ceil(halo / scale))


def _run_phases(phases, seconds: dict[str, float]):
    """Generator: the phases one after the other on one progress scale; their times in ``seconds``."""
    end, before = sum(steps for _, steps, _ in phases), 0
    for name, steps, start in phases:
        started = time.perf_counter()
        yield from offset_steps(start(), before, end - before - steps)
        before += steps
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started


def _bounding_region(polygon: np.ndarray) -> Region:
    """The level-0 rectangle around a polygon's vertices (the pixels they fall on included)."""
    (y0, x0), (y1, x1) = np.floor(polygon.min(0)).astype(int), np.floor(polygon.max(0)).astype(int) + 1
    return Region(int(x0), int(y0), int(x1 - x0), int(y1 - y0))


def _polygon_mask(polygon: np.ndarray, shape: tuple[int, int], top: float, left: float, scale=1.0):
    """Pixels of a ``shape`` window at ``(top, left)`` (level-0 px, ``scale`` level-0 px a pixel,
    or ``(down, across)``) inside ``polygon``."""
    from skimage.draw import polygon2mask

    return polygon2mask(shape, (polygon - (top, left)) / scale)


def _class_record(segmenter) -> dict:
    """The model's class names and colours, recorded with the results (a reopened label pyramid
    names its classes from them)."""
    colors = getattr(getattr(segmenter, "meta", None), "colors", None)
    return {"classes": list(segmenter.classes), "colors": [list(map(int, c)) for c in colors] if colors else None}


def _colour_model(segmenter) -> bool:
    """Whether the model takes colour (H&E) images; a stand-in without a checkpoint counts as one."""
    meta = getattr(segmenter, "meta", None)
    return meta is None or meta.model.in_channels == 3


def _within(tissue: TissueMask, polygon: np.ndarray | None) -> TissueMask:
    """The tissue mask cut to the polygon (grown by a mask pixel): blocks outside it are never read."""
    if polygon is None:
        return tissue
    from scipy import ndimage as ndi

    scales = np.asarray(tissue.scales)
    inside = _polygon_mask(polygon, tissue.mask.shape, 0, 0, scales)
    # and the mask pixels its outline crosses: a polygon narrower than a mask pixel (32-64 level-0
    # px) holds no mask pixel's centre, and its region would have been skipped as glass
    from skimage.draw import polygon_perimeter

    rows, cols = polygon_perimeter(*(polygon / scales).T, shape=tissue.mask.shape, clip=True)
    inside[rows, cols] = True
    return TissueMask(tissue.mask & ndi.binary_dilation(inside), tissue.downsample, tissue.dark_field,
                      tissue.downsample_x, tissue.gray)


def _iter_cut_and_count(store, region: Region, polygon: np.ndarray | None, classes: list[str], result: SlideResult,
                        block: int):
    """Generator, a step per block: outside ``polygon`` the class map (and distance map) become
    background; ``result`` gets each class's pixels in the region (inside the polygon)."""
    counts, blocks, region_px = np.zeros(len(classes), np.int64), region_blocks(region, block), 0
    for done, (y0, y1, x0, x1) in enumerate(blocks, start=1):
        part = np.asarray(store["classes/0"][y0:y1, x0:x1])
        inside = np.ones(part.shape, bool) if polygon is None else _polygon_mask(polygon, part.shape, y0, x0)
        if polygon is not None and part[~inside].any():
            store["classes/0"][y0:y1, x0:x1] = np.where(inside, part, 0)
            if "distance" in store:
                store["distance/0"][y0:y1, x0:x1] = np.where(inside, store["distance/0"][y0:y1, x0:x1], 0)
        counts += np.bincount(part[inside], minlength=len(classes))[:len(classes)]
        region_px += int(inside.sum())
        yield done, len(blocks)
    result.class_px = {name: int(n) for name, n in zip(classes[1:], counts[1:])}
    result.region_px = region_px


def _iter_nuclei(segmenter, slide, store, region: Region, instance_settings, files: SlideResultFiles,
                 result: SlideResult, block: int, halo: int):
    """Nuclei of the region, block by block, each block's outlines and rows written as it is done."""
    names = segmenter.classes
    # sizes are given at the model's pixel size; the nuclei are cut on the slide's own grid
    instance_settings = settings_at_image_scale(segmenter.scale_for(slide.pixel_size_um), None,
                                                instance_settings or segmenter.instance_settings)[1]
    geojson = GeoJSONStream(files.path("geojson"), names, class_colors(names), file=files.temp("geojson"))
    table = CSVStream(files.path("csv"), file=files.temp("csv"))
    # the header, whatever follows: a region without nuclei is an empty table, not an empty file
    table.add(object_table(np.zeros((1, 1), np.int32), np.zeros((1, 1), np.uint8), names,
                           pixel_size_um=slide.pixel_size_um))
    counts = np.zeros(len(names), np.int64)

    def write_block(block: NucleiBlock) -> None:
        top, left = block.top + region.y, block.left + region.x
        geojson.add(block.instances, block.classes, top, left)
        rows = object_table(block.instances, block.class_map, names, pixel_size_um=slide.pixel_size_um)
        rows["centroid_y"] = rows["centroid_y"] + top
        rows["centroid_x"] = rows["centroid_x"] + left
        table.add(rows)
        np.add.at(counts, rows["class_id"], 1)

    view = lambda name: _RegionView(store[name], region) if name in store else None  # noqa: E731
    try:
        result.nuclei = yield from iter_stitched_instances(view("classes/0"), view("instances/0"), instance_settings,
                                                           view("distance/0"), block, halo, on_block=write_block)
    except BaseException:  # cancelled (GeneratorExit) or failed: no half-written export is left
        geojson.abort()
        table.abort()
        raise
    geojson.close()
    table.close()
    if "distance" in store:  # the seeds' map served the cutting: 90 % of the store, of no use after
        del store["distance"]
    result.counts = {name: int(c) for name, c in zip(names[1:], counts[1:])}
    if counts[0]:
        result.counts[UNCLASSIFIED] = int(counts[0])


class _RegionView:
    """A 2-D array seen through a region: ``view[a:b, c:d]`` reads and writes ``array`` shifted
    by the region's corner (so block-wise code runs on a region of a slide-sized store)."""

    def __init__(self, array, region: Region):
        self._array, self._region = array, region
        self.shape = (region.height, region.width)

    def _shifted(self, key):
        rows, cols = key
        return (slice(rows.start + self._region.y, rows.stop + self._region.y),
                slice(cols.start + self._region.x, cols.stop + self._region.x))

    def __getitem__(self, key):
        return self._array[self._shifted(key)]

    def __setitem__(self, key, value):
        self._array[self._shifted(key)] = value
