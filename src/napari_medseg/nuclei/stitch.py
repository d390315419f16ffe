"""Nuclei of a whole slide, cut block by block with one id per nucleus across block borders.

The watershed of a whole slide does not fit in memory, so it runs on one block at a time, on a
window that adds a ``halo`` of context around the block (wider than a nucleus). Each nucleus
found in a window belongs to the block that holds its centre: it is kept, whole, by that block
only and dropped by every other window that sees it. So a nucleus on a seam is neither split
(it is cut from a window that sees all of it) nor duplicated (one block owns it). Ids are given
in block order and are unique over the slide.

Nothing here holds more than one window: the class map, distance map and instance map may be
zarr arrays or memmaps of any size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..steps import run_steps
from .votes import InstanceInputError, instance_classes
from .watershed import InstanceSettings, semantic_to_instances

BLOCK = 1024  # px per side of a block: a window of ~1.3 Mpx keeps the watershed's maps small
HALO = 64  # px of context around a block: wider than a nucleus at 40x (15-40 px)


@dataclass
class NucleiBlock:
    """The nuclei one block owns: ``instances`` (slide ids, 0 elsewhere) over the window at
    ``(top, left)`` of the slide, and ``classes[id]``, each nucleus's majority class."""

    top: int
    left: int
    instances: np.ndarray
    classes: dict[int, int]
    class_map: np.ndarray


def block_grid(height: int, width: int, block: int = BLOCK) -> list[tuple[int, int, int, int]]:
    """Blocks ``(y0, y1, x0, x1)`` covering ``height x width``, in raster order."""
    return [(y, min(y + block, height), x, min(x + block, width))
            for y in range(0, height, block) for x in range(0, width, block)]


def iter_stitched_instances(class_map, out, settings: InstanceSettings | None = None, distance=None,
                            block: int = BLOCK, halo: int = HALO, on_block=None):
    """Generator: yields ``(blocks done, blocks)``; fills ``out`` (int32 ``(H, W)``, zeros) with
    nucleus ids and returns how many nuclei it found.

    ``class_map`` (and ``distance``, a model's nucleus distance map) are read window by window;
    ``on_block(NucleiBlock)`` receives each block's nuclei (for tables and outlines) as it is done.
    """
    height, width = _checked_shapes(class_map, out, distance)
    blocks = block_grid(height, width, block)
    next_id = 1
    for done, (y0, y1, x0, x1) in enumerate(blocks, start=1):
        wy0, wy1, wx0, wx1 = max(0, y0 - halo), min(height, y1 + halo), max(0, x0 - halo), min(width, x1 + halo)
        window_classes = np.asarray(class_map[wy0:wy1, wx0:wx1])
        if window_classes.any():
            window_distance = None if distance is None else np.asarray(distance[wy0:wy1, wx0:wx1], np.float32)
            local = semantic_to_instances(window_classes, settings, window_distance)
            owned, n = _owned_nuclei(local, (y0 - wy0, y1 - wy0, x0 - wx0, x1 - wx0), next_id)
            if n:
                painted, n = _paint(out, owned, next_id, wy0, wy1, wx0, wx1)
            if n and on_block is not None:  # what the map holds, so tables and outlines match it
                votes = instance_classes(painted - (next_id - 1) * (painted > 0), window_classes)
                on_block(NucleiBlock(wy0, wx0, painted, {next_id + i: int(votes[i + 1]) for i in range(n)},
                                     window_classes))
            next_id += n
        yield done, len(blocks)
    return next_id - 1


def stitched_instances(class_map, out, settings: InstanceSettings | None = None, distance=None,
                       block: int = BLOCK, halo: int = HALO, on_block=None) -> int:
    """``iter_stitched_instances`` run to the end: the number of nuclei written to ``out``."""
    return run_steps(iter_stitched_instances(class_map, out, settings, distance, block, halo, on_block))


def _checked_shapes(class_map, out, distance) -> tuple[int, int]:
    shape = tuple(class_map.shape)
    if len(shape) != 2:
        raise InstanceInputError(f"Instances are derived from 2-D class maps, got shape {shape}.")
    for name, array in (("instance map", out), ("distance map", distance)):
        if array is not None and tuple(array.shape) != shape:
            raise InstanceInputError(f"The {name} {tuple(array.shape)} and the class map {shape} differ in shape.")
    return shape


def _owned_nuclei(local: np.ndarray, core: tuple[int, int, int, int], first_id: int) -> tuple[np.ndarray, int]:
    """The window's nuclei whose centre lies in the block's ``core`` (window coordinates),
    renumbered ``first_id, first_id + 1, ...``; the others are zeroed."""
    from scipy import ndimage as ndi

    ids = np.unique(local)
    ids = ids[ids > 0]
    if ids.size == 0:
        return np.zeros(local.shape, np.int32), 0
    centres = np.asarray(ndi.center_of_mass(np.ones(local.shape, np.uint8), local, ids)).reshape(-1, 2)
    cy, cx = np.floor(centres[:, 0]), np.floor(centres[:, 1])
    y0, y1, x0, x1 = core
    mine = ids[(cy >= y0) & (cy < y1) & (cx >= x0) & (cx < x1)]
    lookup = np.zeros(int(local.max()) + 1, np.int32)
    lookup[mine] = np.arange(first_id, first_id + mine.size, dtype=np.int32)
    return lookup[local], int(mine.size)


def _paint(out, owned: np.ndarray, first_id: int, wy0: int, wy1: int, wx0: int, wx1: int) -> tuple[np.ndarray, int]:
    """Write owned nuclei where no earlier block's nucleus already is (first come keeps a pixel);
    returns ``(what was painted, how many nuclei)``, renumbered from ``first_id``. Windows agree
    on nuclei, but not on a structure wider than the halo (a ring filled only where all of it is
    seen): a nucleus left without a pixel is no nucleus, and one cut by an earlier block's is
    what the map holds of it."""
    target = np.asarray(out[wy0:wy1, wx0:wx1])
    free = (target == 0) & (owned > 0)
    kept = np.unique(owned[free])
    lookup = np.zeros(int(owned.max()) + 1, np.int32)
    lookup[kept] = np.arange(first_id, first_id + kept.size, dtype=np.int32)
    painted = np.where(free, lookup[owned], 0).astype(np.int32)
    target[free] = painted[free]
    out[wy0:wy1, wx0:wx1] = target
    return painted, int(kept.size)
