"""``medseg info``'s summary: what a newcomer asks of a checkpoint first, in a screenful.

The whole metadata (about 600 lines of JSON for the default model) stays behind ``medseg info
--json``; this reads the same record and says only what decides whether the model fits the
images at hand: architecture, classes, pixel size, tile size, files, training data and figures.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from ..models.checkpoint import CheckpointMeta
from ..models.config import CUSTOM_ARCHITECTURES
from ..wording import counted

LABEL_WIDTH = 12
TEXT_WIDTH = 100
# the numbers a held-out record leads with (benchmarks/accuracy.py's headline), in print order
HEADLINE = {"nucleus_dice": "nucleus Dice", "bpq": "bPQ", "mpq": "mPQ", "f1": "F1", "aji": "AJI"}
FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}  # safetensors' names
LABEL_KINDS = {"classes": "classes", "binary": "nucleus vs background"}


def checkpoint_summary(path: Path, meta: CheckpointMeta, name: str) -> list[str]:
    """The summary's lines; ``name``: how the user named the model (for the closing hint)."""
    rows = [
        ("model", _model_words(meta)),
        ("classes", ", ".join(meta.classes)),
        ("pixel size", _pixel_size_words(meta.pixel_size_um)),
        *([("zoom", _zoom_words(meta.network_zoom))] if meta.network_zoom != 1.0 else []),
        ("input tiles", _tile_words(meta)),
        ("weights", _weights_words(path)),
        ("files", str(path.resolve())),
        ("exports", _exports_words(path)),
        ("trained on", _training_words(meta)),
        *_figures_rows(meta),
        ("about", meta.model_card or "no model card recorded"),
        ("made", _made_words(meta)),
    ]
    lines = [line for label, text in rows for line in _wrapped(label, text)]
    more = "" if name == "default" else f" {name}"
    return lines + [f"all metadata as JSON: medseg info{more} --json (every epoch's record: --history)"]


def _wrapped(label: str, text: str) -> list[str]:
    """``label`` then ``text`` wrapped under itself: a model card is one 400-character line."""
    indent = " " * LABEL_WIDTH
    # paths and package names stay whole: a path cut at its hyphen cannot be copied
    return textwrap.wrap(text, TEXT_WIDTH, initial_indent=f"{label:<{LABEL_WIDTH}}", subsequent_indent=indent,
                         break_long_words=False, break_on_hyphens=False) or [label]


def _model_words(meta: CheckpointMeta) -> str:
    m = meta.model
    head = ", with a distance head (splits touching nuclei)" if m.distance_head else ""
    network = m.network_name if m.architecture.lower() in CUSTOM_ARCHITECTURES else f"{m.architecture}, encoder {m.encoder}"
    return f"{network}, {m.in_channels} input channels{head}"


def _zoom_words(zoom: float) -> str:
    return (f"x{zoom:g}: the network runs on the image enlarged that much on the model's pixel grid, as "
            f"measured for these weights; {zoom * zoom:.1f}x the pixels of x1, or more in time (--network-zoom 1)")


def _pixel_size_words(pixel_size_um: float | None) -> str:
    if not pixel_size_um:
        return "not recorded: images are run at the size they are"
    # magnification as scanners name it (0.25 µm/px at 40x): what a user knows of their slides
    return (f"{pixel_size_um:g} µm/px (about {10 / pixel_size_um:.0f}x), as trained; images recording another "
            "size are resampled to it (medseg predict --pixel-size)")


def _tile_words(meta: CheckpointMeta) -> str:
    from ..inference.settings import TileSettings

    crop = ((meta.training or {}).get("config") or {}).get("data", {}).get("crop_size")
    trained = f"trained on {crop}x{crop} px crops; " if crop else ""
    tiles = TileSettings()
    return f"{trained}medseg predict runs {tiles.tile_size} px tiles, {tiles.overlap} px overlap (--tile, --overlap)"


def _weights_words(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as fh:
        dtypes = {fh.get_slice(key).get_dtype() for key in fh.keys()}
    # the float ones: batch-norm counters are int64 in every checkpoint and say nothing
    floats = sorted(FLOAT_DTYPES[d] for d in dtypes if d in FLOAT_DTYPES)
    return f"{path.stat().st_size / 1e6:.1f} MB" + (f" ({'/'.join(floats)})" if floats else "")


def _exports_words(path: Path) -> str:
    """Where the ONNX runtimes' copy of the network goes, and whether it is there yet."""
    from ..models.export import onnx_candidates

    candidates = onnx_candidates(path)
    found = [p for p in candidates if p.is_file()]
    if found:
        return f"ONNX copy for the CPU runtimes: {found[0]}"
    return f"ONNX copy for the CPU runtimes: none yet; written to {candidates[0].parent} when one first runs it"


def _dataset_words(spec) -> str:
    if not isinstance(spec, dict):  # a plain path (one dataset), or 'in-memory'
        return Path(str(spec)).name
    kind = LABEL_KINDS.get(spec.get("labels"), spec.get("labels"))
    return f"{Path(str(spec.get('path', '?'))).name}" + (f" ({kind})" if kind else "")


def _training_words(meta: CheckpointMeta) -> str:
    data = meta.data or {}
    datasets = data.get("datasets") or []
    if not datasets:
        return "not recorded"
    counts = [f"{counted(data[key], f'{what} image')}" for key, what in (("train_images", "training"),
                                                                         ("val_images", "validation"))
              if isinstance(data.get(key), int)]
    return ", ".join(_dataset_words(spec) for spec in datasets) + (f"; {', '.join(counts)}" if counts else "")


def _figures(record: dict, with_classes: bool = True) -> str:
    # mPQ of a nucleus-vs-background set is bPQ again; printing it would read as a class score
    keys = [key for key in HEADLINE if with_classes or key != "mpq"]
    return ", ".join(f"{HEADLINE[key]} {record[key]:.3f}" for key in keys if isinstance(record.get(key), (int, float)))


def _binary_set_names(meta: CheckpointMeta) -> set[str]:
    specs = (meta.data or {}).get("datasets") or []
    return {Path(str(spec.get("path", ""))).name for spec in specs
            if isinstance(spec, dict) and spec.get("labels") == "binary"}


def _figures_rows(meta: CheckpointMeta) -> list[tuple[str, str]]:
    """Held-out figures per set where recorded; else the validation record of the best epoch."""
    metrics = meta.metrics or {}
    sets = (metrics.get("held_out") or {}).get("sets") or {}
    binary_sets = _binary_set_names(meta)
    rows = []
    for name, record in sets.items():
        figures = _figures(record.get("model") or {}, with_classes=name not in binary_sets)
        if figures:
            # held-out source images; the set's other images may have been trained on (same lab, scanner)
            seen = ", other images of the set trained on" if record.get("seen_in_training") else ""
            images = counted(record.get("images", "?"), "image")
            rows.append(("held out" if not rows else "", f"{name} ({images}{seen}): {figures}"))
    if rows:
        return rows
    validation = metrics.get("validation") or {}
    figures = _figures(validation)
    if figures:
        epoch = f" (epoch {validation['epoch']})" if "epoch" in validation else ""
        return [("validation", f"{figures}{epoch}")]
    return [("figures", "no held-out or validation figures recorded")]


def _made_words(meta: CheckpointMeta) -> str:
    versions = meta.versions or {}
    made_with = ", ".join(f"{name} {versions[name]}" for name in ("napari-medseg", "torch") if name in versions)
    when = meta.created[:10] if meta.created else "date not recorded"
    return when + (f" with {made_with}" if made_with else "")
