"""Repeated runs over N seeds, summarised as mean +- standard deviation (the EBHI report averaged 3).

Every run keeps the same train/validation split (``data.split_seed``, default the first seed),
so the spread measures training randomness (initialisation, crops, augmentation, order),
not which images were held out. Runs go to ``OUT/seed_<seed>/``; the summary to
``OUT/repeats.json``. The standard deviation is the sample one (n - 1).
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..io.images import atomic_write
from .config import TrainConfig
from .trainer import TrainingDone, train

SUMMARY_KEYS = ("val_loss", "miou", "mean_dice", "nucleus_dice", "bpq", "pixel_accuracy")


@dataclass
class RepeatsDone:
    runs: list[TrainingDone]
    seeds: list[int]
    summary: dict = field(default_factory=dict)  # key -> {"mean", "std", "values"}
    path: Path | None = None


def summarise(records: list[dict], keys=SUMMARY_KEYS) -> dict:
    out = {}
    for key in keys:
        values = [float(r[key]) for r in records if key in r]
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            continue
        out[key] = {"mean": float(np.mean(finite)),
                    "std": float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0,
                    "values": values}
    return out


def format_summary(summary: dict) -> str:
    return "  ".join(f"{k} {v['mean']:.4f} ± {v['std']:.4f}" for k, v in summary.items())


def train_repeats(cfg: TrainConfig, on_update=None, should_stop=None, items=None, on_run=None) -> RepeatsDone:
    """Train ``cfg.repeats`` times with seeds ``cfg.seed, cfg.seed + 1, ...``."""
    seeds = [cfg.seed + i for i in range(cfg.repeats)]
    out = Path(cfg.out_dir)
    runs = []
    for seed in seeds:
        run_cfg = copy.deepcopy(cfg)
        run_cfg.seed, run_cfg.repeats = seed, 1
        if run_cfg.data.split_seed is None:
            run_cfg.data.split_seed = cfg.seed
        run_cfg.out_dir = str(out / f"seed_{seed}")
        result = train(run_cfg, on_update, should_stop, items)
        runs.append(result)
        if on_run is not None:
            on_run(seed, result)
        if result.reason == "stopped by user":
            break
    summary = summarise([r.best_metrics for r in runs])
    report = {"seeds": seeds[:len(runs)], "summary": summary,
              "runs": [{"seed": r.seed, "best_epoch": r.best_epoch, "checkpoint": str(r.checkpoint) if r.checkpoint else None,
                        "best": {k: r.best_metrics.get(k) for k in ("epoch",) + SUMMARY_KEYS}} for r in runs]}
    path = out / "repeats.json"
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 writes
        text = json.dumps(report, indent=1)
        atomic_write(path, lambda tmp: tmp.write_text(text))
    return RepeatsDone(runs, seeds[:len(runs)], summary, path)
