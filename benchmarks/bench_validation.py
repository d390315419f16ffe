"""How long the trainer takes to validate: the shipped default scored on a config's held-out
images per set, as each epoch of that config scores them (its precision, threshold, class
weights and nucleus settings), timed over a few repeats; the figures are printed with the time so
that a faster path can be seen to give the same scores.

    python benchmarks/bench_validation.py [--config configs/all_data.yaml] [--repeats 3] [--profile]

``--profile``: the slowest calls of the last repeat (cProfile, by cumulative time).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def main(argv=None) -> int:
    from napari_medseg.models.registry import build_model
    from napari_medseg.nuclei.watershed import InstanceSettings
    from napari_medseg.training.data import normalization_stats
    from napari_medseg.training.distributed import DistContext
    from napari_medseg.training.network import Precision
    from napari_medseg.training.setup import build_loaders, configure_runtime, load_start_checkpoint, prepare_data
    from napari_medseg.training.stages import load_train_stages
    from napari_medseg.training.trainer import _loss_function
    from napari_medseg.training.validation import validate_sets

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "all_data.yaml"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)

    cfg = load_train_stages(args.config)[0].config
    configure_runtime(cfg)
    start = load_start_checkpoint(cfg)
    if start is None:
        parser.error(f"{args.config} has no init_checkpoint: there is no model to validate")
    data = prepare_data(cfg, None, start)
    device = torch.device("cpu")
    mean, std = normalization_stats(cfg.normalization)
    loaders = build_loaders(cfg, data, DistContext(), device, mean, std)
    model = build_model(replace(cfg.model, encoder_weights=None))
    model.load_state_dict(start.weights)
    precision = Precision.for_device(cfg, device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = _loss_function(cfg, data, device)
    for s in loaders.val_sets:
        print(f"{s.name or 'validation'}: {len(s.instances)} images of {sorted({i.shape for i in s.instances})}")

    seconds, profile = [], cProfile.Profile()
    for repeat in range(args.repeats):
        last = args.profile and repeat == args.repeats - 1
        began = time.perf_counter()
        if last:
            profile.enable()
        _, metrics = validate_sets(model, loaders.val_sets, loss_fn, len(data.classes), device, None,
                                   precision.autocast, precision.channels_last,
                                   InstanceSettings.recorded(start.instance_settings), start.foreground_threshold,
                                   start.class_choice_weights)
        if last:
            profile.disable()
        seconds.append(time.perf_counter() - began)
    for name, m in (metrics.get("sets") or {"": metrics}).items():
        print(f"{name or 'validation':14s} nucleus Dice {m['nucleus_dice']:.4f}  bPQ {m.get('bpq', float('nan')):.4f}")
    print(f"validation: {statistics.median(seconds):.2f} s (median of {len(seconds)}: "
          f"{', '.join(f'{s:.2f}' for s in seconds)}) on {torch.get_num_threads()} threads")
    if args.profile:
        pstats.Stats(profile).sort_stats("cumulative").print_stats(20)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
