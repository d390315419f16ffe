"""Choose the nucleus post-processing (marker threshold, smallest nucleus, smallest seed) by
measurement: on *training* images of every set, the setting whose weakest set's bPQ is highest;
then the held-out images check it against the current defaults (``InstanceSettings``).

    python benchmarks/tune_instances.py --threads 2                     # the shipped default model
    python benchmarks/tune_instances.py --threads 2 --before 0.5,10,4   # against the settings before the sweep
    python benchmarks/tune_instances.py --model runs/x/best.safetensors --groups-per-set 6

(``medseg tune-nuclei`` does the same for one model and records the choice in its checkpoint.)

Training images: ``--groups-per-set`` source images of each set the split model trained on,
taken evenly from its sorted training groups (the model has seen them: its outputs there are
surer than on new images, so the choice is a little biased towards its training behaviour, never
towards the held-out images). The model runs once per image; each setting re-runs the watershed
only (``napari_medseg.evaluation.instance_tuning``).

Last line, machine-readable: ``chosen=... heldout_<set>=<bPQ now>-><bPQ chosen> ...``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDSEG_DATA", REPO.parent / "shared" / "data"))
sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from napari_medseg.evaluation.instance_tuning import (  # noqa: E402
    MARKER_THRESHOLDS, MIN_MARKER_SIZES, MIN_SIZES, binary_pq, model_outputs, score_grid, settings_grid,
    weakest_set_best)
from napari_medseg.evaluation.threshold import samples_of_groups  # noqa: E402
from napari_medseg.io.dataset import open_dataset, source_group  # noqa: E402
from napari_medseg.nuclei.watershed import InstanceSettings  # noqa: E402

DEFAULT_SETS = ("consep_train", "monuseg_train", "tnbc_train")
TUNED = ("marker_threshold", "min_size", "min_marker_size")


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="'default' or a .safetensors checkpoint")
    parser.add_argument("--split-from-model", default=None, help="whose validation groups are held out (default: --model)")
    parser.add_argument("--sets", default=",".join(str(DATA / n) for n in DEFAULT_SETS), help="dataset folders")
    parser.add_argument("--groups-per-set", type=int, default=4, help="training source images per set to tune on")
    parser.add_argument("--marker-thresholds", type=_floats, default=list(MARKER_THRESHOLDS))
    parser.add_argument("--min-sizes", type=_ints, default=list(MIN_SIZES), help="smallest nucleus (px)")
    parser.add_argument("--min-marker-sizes", type=_ints, default=list(MIN_MARKER_SIZES), help="smallest seed (px)")
    parser.add_argument("--before", type=_floats, metavar="MARKER,MIN_SIZE,MIN_MARKER_SIZE",
                        help="the setting to compare the choice with (default: the model's own, else InstanceSettings' "
                             "defaults)")
    parser.add_argument("--tta", action="store_true", help="the model runs with test-time flips (4x the time)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser


def _split(folder: Path, val_groups: list[str], per_set: int) -> tuple[list[str], list[str]]:
    """(training groups to tune on, held-out groups) of one dataset folder."""
    groups = sorted({source_group(stem) for stem in open_dataset(folder, require_labels=True).stems})
    held_out = [g for g in groups if f"{folder.name}/{g}" in val_groups]
    training = [g for g in groups if f"{folder.name}/{g}" not in val_groups]
    step = max(1, len(training) // per_set)
    return training[::step][:per_set], held_out


def _line(settings: InstanceSettings) -> str:
    return " ".join(f"{k}={v}" for k, v in asdict(settings).items() if k in TUNED)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    import torch

    from napari_medseg.inference import Segmenter, TileSettings

    torch.set_num_threads(args.threads)
    tiles = TileSettings(tta=args.tta)
    # torch: the float32 reference, so the choice does not depend on this CPU's half precisions
    segmenter = Segmenter.load(args.model, device="cpu", backend="torch")
    split_meta = Segmenter.load(args.split_from_model, device="cpu").meta if args.split_from_model else segmenter.meta
    val_groups = split_meta.data.get("val_groups") or []
    if not val_groups:
        sys.exit(f"{args.split_from_model or args.model} names no validation groups")
    train_outputs, held_out_outputs = {}, {}
    t0 = time.perf_counter()
    for folder in [Path(f.strip()) for f in args.sets.split(",") if f.strip()]:
        training, held_out = _split(folder, val_groups, args.groups_per_set)
        if not held_out:
            print(f"{folder.name}: the split holds none of its images out; skipped")
            continue
        train_outputs[folder.name] = model_outputs(segmenter, samples_of_groups(folder, training)[1], tiles)
        held_out_outputs[folder.name] = model_outputs(segmenter, samples_of_groups(folder, held_out)[1], tiles)
        print(f"{folder.name}: tuned on {', '.join(training)} ({len(train_outputs[folder.name])} images); "
              f"held out {', '.join(held_out)} ({len(held_out_outputs[folder.name])} images)")
    print(f"model outputs: {time.perf_counter() - t0:.0f} s")

    current = segmenter.instance_settings  # the model's own (medseg tune-nuclei), else InstanceSettings' defaults
    if args.before:
        marker, min_size, min_marker_size = args.before
        current = InstanceSettings(marker_threshold=marker, min_size=int(min_size), min_marker_size=int(min_marker_size))
    grid = settings_grid(current, marker_threshold=args.marker_thresholds, min_size=args.min_sizes,
                         min_marker_size=args.min_marker_sizes)
    t0 = time.perf_counter()
    scores = score_grid(train_outputs, grid)
    print(f"{len(grid)} settings scored in {time.perf_counter() - t0:.0f} s (training images, bPQ)")
    names = list(train_outputs)
    ranked = sorted(zip(grid, scores), key=lambda p: -min(p[1].values()))
    print("| " + " | ".join(TUNED) + " | " + " | ".join(names) + " | weakest |")
    print("|" + "---|" * (len(TUNED) + len(names) + 1))
    for settings, row in ranked[:12]:
        print("| " + " | ".join(str(getattr(settings, k)) for k in TUNED) + " | "
              + " | ".join(f"{row[n]:.4f}" for n in names) + f" | {min(row.values()):.4f} |")
    chosen, chosen_scores = weakest_set_best(grid, scores)
    print(f"\nchosen (weakest training set best): {_line(chosen)}; compared with: {_line(current)}")
    print("bPQ, compared -> chosen:")
    summary = []
    for name, outputs in held_out_outputs.items():
        before, after = binary_pq(outputs, current), binary_pq(outputs, chosen)
        print(f"  {name}: training images {binary_pq(train_outputs[name], current):.4f} -> "
              f"{chosen_scores[name]:.4f}; held out {before:.4f} -> {after:.4f}")
        summary.append(f"heldout_{name}={before:.4f}->{after:.4f}")
    print(f"chosen={_line(chosen).replace(' ', ',')} " + " ".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
