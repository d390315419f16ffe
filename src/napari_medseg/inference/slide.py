"""``medseg predict SLIDE``: a region (or the whole slide) segmented at flat memory, its nuclei
cut block by block, and the results written for QuPath and napari.

One step generator over three phases on one progress scale: the model over tissue blocks
(``regions``), nuclei stitched block by block (``nuclei.stitch``, with the GeoJSON outlines and
CSV rows of each block written as it is done), then the label pyramids (zarr, OME-TIFF).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..colors import class_colors
from ..io.images import file_stem
from ..io.slide_outputs import (CSVStream, GeoJSONStream, build_pyramid, create_result_store, write_pyramid_tiff)
from ..nuclei.measure import object_table
from ..nuclei.stitch import BLOCK as NUCLEI_BLOCK
from ..nuclei.stitch import NucleiBlock, block_grid, iter_stitched_instances
from ..nuclei.watershed import InstanceSettings
from ..steps import offset_steps, run_steps
from .regions import (BLOCK, PROGRESS_PER_BLOCK, Region, TissueSettings, find_tissue, iter_segment_region,
                      region_blocks, whole_slide)
from .postprocess import PostprocessSettings
from .settings import TileSettings


@dataclass
class SlideResult:
    """What a slide run made: the region, how much of it was tissue, the nuclei per class, the files."""

    region: Region
    tissue_fraction: float
    segmented_px: int
    nuclei: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # per phase: model, nuclei, pyramids


def iter_predict_slide(segmenter, slide, out_dir: str | os.PathLike, region: Region | None = None,
                       settings: TileSettings | None = None, instance_settings: InstanceSettings | None = None,
                       tissue_settings: TissueSettings | None = None, nuclei: bool = True, block: int = BLOCK,
                       nuclei_block: int = NUCLEI_BLOCK, postprocess: PostprocessSettings | None = None):
    """Generator: yields ``(done, total)``; returns a ``SlideResult``. Files go to ``out_dir``:
    ``<slide>.zarr`` (multiscale ``classes`` and ``instances``, aligned with the slide),
    ``<slide>_labels.ome.tif`` (class map), and with ``nuclei``: ``<slide>_instances.ome.tif``,
    ``<slide>_nuclei.geojson`` (QuPath, level-0 px) and ``<slide>_nuclei.csv`` (areas in µm²)."""
    started = time.perf_counter()
    region = (region or whole_slide(slide)).checked(slide.shape)
    out_dir, stem = Path(out_dir), file_stem(slide.path)
    tissue = find_tissue(slide, tissue_settings)
    seg_total = PROGRESS_PER_BLOCK * sum(tissue.any_in(*b) for b in region_blocks(region, block))
    nuc_total = len(block_grid(region.height, region.width, nuclei_block)) if nuclei else 0
    maps = ("classes", "instances") if nuclei else ("classes",)
    end = seg_total + nuc_total + 2 * len(maps)  # then a pyramid and an OME-TIFF per map
    names = {"classes": "uint8", **({"instances": "int32"} if nuclei else {})}
    if nuclei and segmenter.has_distance_head:
        names["distance"] = "float16"
    store = create_result_store(out_dir / f"{stem}.zarr", slide.shape, names, block // 2, slide.pixel_size_um)
    classes, distance = store["classes/0"], store["distance/0"] if "distance" in names else None
    result = SlideResult(region, tissue.fraction, 0, files={"store": out_dir / f"{stem}.zarr"})
    result.segmented_px = yield from offset_steps(
        iter_segment_region(segmenter, slide, region, classes, distance, settings, tissue, block,
                            postprocess=postprocess),
        0, end - seg_total)
    result.seconds["model"] = time.perf_counter() - started
    if nuclei:
        yield from offset_steps(_iter_nuclei(segmenter, slide, store, region, instance_settings, out_dir / stem,
                                             result, nuclei_block), seg_total, 2 * len(maps))
        result.seconds["nuclei"] = time.perf_counter() - started - result.seconds["model"]
    pyramids_started = time.perf_counter()
    for i, name in enumerate(maps):
        build_pyramid(store[name], pixel_size_um=slide.pixel_size_um)
        yield end - 2 * (len(maps) - i) + 1, end
        suffix = "labels" if name == "classes" else name  # as the reader and `medseg predict` name class maps
        result.files[f"{name}_tiff"] = write_pyramid_tiff(out_dir / f"{stem}_{suffix}.ome.tif", store[name],
                                                          slide.pixel_size_um)
        yield end - 2 * (len(maps) - i) + 2, end
    result.seconds["pyramids"] = time.perf_counter() - pyramids_started
    return result


def predict_slide(segmenter, slide, out_dir, region: Region | None = None, progress=None, should_cancel=None,
                  **options) -> SlideResult:
    """``iter_predict_slide`` run to the end (the ``medseg predict SLIDE`` entry point)."""
    return run_steps(iter_predict_slide(segmenter, slide, out_dir, region, **options), progress, should_cancel)


def _iter_nuclei(segmenter, slide, store, region: Region, instance_settings, prefix: Path, result: SlideResult,
                 block: int):
    """Nuclei of the region, block by block, each block's outlines and rows written as it is done."""
    names = segmenter.classes
    geojson = GeoJSONStream(prefix.with_name(prefix.name + "_nuclei.geojson"), names, class_colors(names))
    table = CSVStream(prefix.with_name(prefix.name + "_nuclei.csv"))
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
                                                           view("distance/0"), block, on_block=write_block)
    except BaseException:  # cancelled (GeneratorExit) or failed: no half-written export is left
        geojson.abort()
        table.abort()
        raise
    result.files["geojson"], result.files["csv"] = geojson.close(), table.close()
    result.counts = {name: int(c) for name, c in zip(names[1:], counts[1:])}
    if counts[0]:
        result.counts["unclassified"] = int(counts[0])


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
