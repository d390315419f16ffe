"""Same-budget comparison of architectures x losses on one held-out split, plus the classical baseline.

Architectures (``configs/compare_*.yaml``, identical but for the model): vanilla U-Net,
U-Net ResNet34, DeepLabV3+ ResNet50, Attention Residual U-Net, U-Net++ ResNet34 — all from
scratch (no downloads). Losses: ``ce_dice`` (cross-entropy + Dice, no class weights) and
``weighted_ce`` (cross-entropy with ``class_weights: auto``).

Budget: ``--budget-s`` seconds per run (default), or ``--epochs`` for a fixed number of
epochs. The seconds are CPU seconds of this process (``--clock cpu``, the default: with one
torch thread that is compute time, unaffected by other jobs on a shared machine) or
wall-clock seconds (``--clock wall``, for a dedicated machine or a GPU). With a time budget
the script first times a few training steps and one validation pass of each model on this
machine (once per architecture, so both losses get the same epochs), then trains for the
number of whole epochs that fits in the budget (at least 1), so the learning-rate schedule
always runs to its end; a run that overruns 1.5x its budget is stopped (marked in the
table). ``--val-crop`` makes the per-epoch validation (checkpoint choice) cheaper. The
validation split is the same for every run: the trainer's seeded split by source image,
checked against the reference model's ``val_groups`` (``--split-from-model``, default the
shipped default model: CoNSeP train_12/19/22/25). Every run is then scored like
``benchmarks/accuracy.py`` (Segmenter, watershed instances, binary Dice, bPQ, mPQ, F1, AJI,
per-class F1 and IoU), as is the classical baseline.

    python benchmarks/compare_models.py --budget-s 240 --json runs/compare/results.json
    python benchmarks/compare_models.py --epochs 30 --threads 8 --device cuda   # a real budget

Machine-readable lines: ``run=<arch>/<loss> epochs=.. train_s=.. nucleus_dice=.. bpq=.. mpq=.. aji=..``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from accuracy import (DATA, evaluate_baseline, evaluate_segmenter, format_table, trained_normalization,  # noqa: E402
                      validation_samples)

ARCHITECTURES = {
    "vanilla_unet": "configs/compare_vanilla_unet.yaml",
    "unet_resnet34": "configs/compare_unet_resnet34.yaml",
    "deeplabv3plus_resnet50": "configs/compare_deeplabv3plus_resnet50.yaml",
    "attention_res_unet": "configs/compare_attention_res_unet.yaml",
    "unetplusplus_resnet34": "configs/compare_unetplusplus_resnet34.yaml",
}
LOSSES = {
    "ce_dice": ["loss=ce_dice", "class_weights=null"],
    "weighted_ce": ["loss=weighted_ce", "class_weights=auto"],
}
HARD_CAP = 1.5  # a run is stopped at this multiple of its time budget


def time_model(cfg, n_train: int, n_val: int, clock=time.perf_counter, val_size: int = 256,
               steps: int = 3) -> tuple[float, float]:
    """(seconds per training step, seconds per validation pass) of ``cfg``'s model on this machine."""
    import torch

    from napari_medseg.models.registry import build_model
    from napari_medseg.training.losses import build_loss

    torch.manual_seed(0)
    model = build_model(cfg.model)
    loss_fn = build_loss("ce_dice")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    c = cfg.data.crop_size
    x = torch.rand(cfg.batch_size, cfg.model.in_channels, c, c)
    y = torch.randint(0, cfg.model.num_classes, (cfg.batch_size, c, c))
    model.train()
    times = []
    for _ in range(steps + 1):  # the first step warms up (allocations, kernels)
        t0 = clock()
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(clock() - t0)
    step_s = sorted(times[1:])[len(times[1:]) // 2]
    model.eval()
    xv = torch.rand(min(cfg.batch_size, n_val), cfg.model.in_channels, val_size, val_size)
    with torch.inference_mode():
        model(xv[:1])
        t0 = clock()
        model(xv)
        val_s = (clock() - t0) * n_val / len(xv)
    return step_s, val_s


def print_report(results: dict, classes: list[str], json_path=None) -> None:
    """The tables and machine-readable lines of a results dict (as written to the JSON)."""
    s = results["settings"]
    clock, budget_text, baseline = s.get("clock", "cpu"), s["budget"], results["baseline"]
    n_val, val_groups = s["n_val"], s["val_groups"]
    ok = {k: v for k, v in results["runs"].items() if "nucleus_dice" in v}
    print(f"\nSmall-budget comparison ({budget_text} per run), {n_val} validation patches of {', '.join(val_groups)}:\n")
    print(f"| run | params (M) | epochs | train {clock} s | Dice | bPQ | mPQ | F1 | AJI | mIoU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for run, r in sorted(ok.items(), key=lambda kv: -kv[1]["nucleus_dice"]):
        cap = " (capped)" if r["stopped"] else ""
        print(f"| {run} | {r['params_m']:.1f} | {r['epochs_done']}{cap} | {r['train_s']:.0f} | {r['nucleus_dice']:.4f} | {r['bpq']:.4f} "
              f"| {r['mpq']:.4f} | {r['f1']:.4f} | {r['aji']:.4f} | {r['miou']:.4f} |")
    b = baseline
    print(f"| classical baseline | - | - | - | {b['nucleus_dice']:.4f} | {b['bpq']:.4f} | {b['mpq']:.4f} | {b['f1']:.4f} "
          f"| {b['aji']:.4f} | - |")
    print("\nPer-class F1 and IoU:\n")
    for line in format_table({run: r for run, r in ok.items()}, classes):
        print(line)
    for run, r in results["runs"].items():
        if "error" in r:
            print(f"{run}: FAILED {r['error']}")
    if json_path is not None:
        print(f"\nwrote {json_path}; total {results.get('total_s', float('nan')) / 60:.1f} min")
    for run, r in ok.items():
        print(f"run={run} epochs={r['epochs_done']} train_s={r['train_s']:.0f} nucleus_dice={r['nucleus_dice']:.4f} bpq={r['bpq']:.4f} "
              f"mpq={r['mpq']:.4f} f1={r['f1']:.4f} aji={r['aji']:.4f}")
    print(f"run=baseline nucleus_dice={b['nucleus_dice']:.4f} bpq={b['bpq']:.4f} aji={b['aji']:.4f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--budget-s", type=float, default=240.0, help="seconds per run (default 240), see --clock")
    budget.add_argument("--epochs", type=int, help="a fixed number of epochs per run instead of a time budget")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="budget in CPU seconds of this process (default; fair on a shared machine) or wall-clock")
    parser.add_argument("--archs", default=",".join(ARCHITECTURES), help=f"comma-separated subset of {', '.join(ARCHITECTURES)}")
    parser.add_argument("--losses", default=",".join(LOSSES), help=f"comma-separated subset of {', '.join(LOSSES)}")
    parser.add_argument("--data", default=str(DATA / "consep_train"))
    parser.add_argument("--split-from-model", default="default", help="checkpoint whose val_groups every run must match")
    parser.add_argument("--crop", type=int, default=128, help="training crop size")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--val-crop", type=int, default=0,
                        help="validate during training (checkpoint choice) on the centre crop of this size of each "
                             "validation image, to save time; 0 = whole images. Final scores always use whole images.")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(REPO / "runs" / "compare"), help="checkpoints go to OUT/<arch>_<loss>/")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override for every run")
    parser.add_argument("--json", help="write all results here (default OUT/results.json)")
    parser.add_argument("--report", metavar="JSON", help="only print the tables of an earlier run's results file")
    args = parser.parse_args(argv)
    if args.report:
        results = json.loads(Path(args.report).read_text())
        ok = [r for r in results["runs"].values() if "per_class" in r]
        classes = ["background", *(ok[0]["per_class"] if ok else results["baseline"]["per_class"])]
        print_report(results, classes)
        return 0

    import torch

    from napari_medseg.inference import Segmenter
    from napari_medseg.training import load_train_config, train

    torch.set_num_threads(args.threads)
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    losses = [x.strip() for x in args.losses.split(",") if x.strip()]
    for name, known in ((archs, ARCHITECTURES), (losses, LOSSES)):
        bad = [n for n in name if n not in known]
        if bad:
            parser.error(f"unknown: {', '.join(bad)} (choose from {', '.join(known)})")
    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    json_path = Path(args.json) if args.json else out_root / "results.json"

    reference = Segmenter.load(args.split_from_model, device="cpu").meta
    val_groups = sorted(reference.data.get("val_groups") or [])
    if not val_groups:
        parser.error(f"{args.split_from_model} names no validation groups")
    split_seed = reference.training.get("config", {}).get("seed", 0)
    val_fraction = reference.training.get("config", {}).get("data", {}).get("val_fraction", 0.15)
    classes, samples = validation_samples(args.data, val_groups)
    from napari_medseg.io.dataset import open_dataset

    n_all = len(open_dataset(args.data).stems)
    n_val, n_train = len(samples), n_all - len(samples)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    budget_text = f"{args.epochs} epochs" if args.epochs else f"{args.budget_s:.0f} {args.clock} s"
    print(f"data {args.data}: {n_train} training / {n_val} validation images; validation groups {', '.join(val_groups)}")
    print(f"budget per run: {budget_text}; crop {args.crop}, batch {args.batch_size}, {args.threads} thread(s), "
          f"device {args.device}; {len(archs) * len(losses)} runs", flush=True)

    items = None
    if args.val_crop:
        from napari_medseg.training.data import load_dataset_folders

        data_items, data_classes = load_dataset_folders([args.data], r"^(.*)_\d+$", 3)
        for it in data_items:
            if it.group in val_groups:
                h, w = it.labels.shape
                c = min(args.val_crop, h, w)
                y, x = (h - c) // 2, (w - c) // 2
                it.image, it.labels = it.image[y:y + c, x:x + c].copy(), it.labels[y:y + c, x:x + c].copy()
        items = (data_items, data_classes)

    baseline, _ = evaluate_baseline(classes, samples)
    results = {"settings": {**vars(args), "val_groups": val_groups, "n_train": n_train, "n_val": n_val,
                            "torch": torch.__version__, "budget": budget_text},
               "baseline": baseline, "runs": {}}
    t_start = time.time()
    timings: dict[str, tuple[float, float]] = {}
    for arch in archs:
        for loss in losses:
            run = f"{arch}/{loss}"
            out_dir = out_root / f"{arch}_{loss}"
            overrides = LOSSES[loss] + [
                f"data.dataset=[{args.data}]", f"data.crop_size={args.crop}", f"batch_size={args.batch_size}",
                f"num_threads={args.threads}", f"device={args.device}", f"out_dir={out_dir}", f"seed={split_seed}",
                f"data.val_fraction={val_fraction}", *args.set,
            ]
            cfg = load_train_config(REPO / ARCHITECTURES[arch], overrides)
            steps_per_epoch = max(1, math.ceil(n_train * cfg.data.crops_per_image / cfg.batch_size))
            step_s = val_s = float("nan")
            if args.epochs:
                epochs, limit = args.epochs, None
            else:
                if arch not in timings:  # timed once per architecture: both losses get the same epochs
                    timings[arch] = time_model(cfg, n_train, n_val, clock, val_size=args.val_crop or 256)
                step_s, val_s = timings[arch]
                per_epoch = steps_per_epoch * step_s + val_s
                epochs = max(1, int((args.budget_s - 5.0) // per_epoch))
                limit = HARD_CAP * args.budget_s
            cfg.epochs = epochs
            cfg.model_card = (cfg.model_card + f" Budget: {budget_text} ({epochs} epochs) on {args.device} "
                              f"with {args.threads} thread(s): a small-budget comparison run, not a finished model.")
            print(f"\n[{run}] {epochs} epoch(s) of {steps_per_epoch} steps"
                  + (f" (timed {step_s:.2f} s/step, {val_s:.1f} s/validation)" if not args.epochs else ""), flush=True)
            t0, wall0 = clock(), time.time()

            def should_stop(t0=t0, limit=limit):
                return limit is not None and clock() - t0 > limit

            def report(update):
                if type(update).__name__ == "EpochDone":
                    m = update.metrics
                    print(f"  epoch {update.epoch}/{update.epochs} train_loss {update.train_loss:.4f} "
                          f"val_loss {update.val_loss:.4f} val_nucleus_dice {m.get('nucleus_dice', float('nan')):.4f} "
                          f"val_mean_class_dice {m.get('mean_dice', float('nan')):.4f} {'*' if update.best else ''} "
                          f"{update.seconds:.0f}s", flush=True)

            try:
                done = train(cfg, on_update=report, should_stop=should_stop, items=items)
            except Exception as exc:  # one failing run must not lose the others
                print(f"  FAILED: {type(exc).__name__}: {exc}", flush=True)
                results["runs"][run] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            train_s, train_wall_s = clock() - t0, time.time() - wall0
            entry = {"arch": arch, "loss": loss, "epochs_planned": epochs, "best_epoch": done.best_epoch,
                     "epochs_done": len(done.history), "train_s": train_s, "train_wall_s": train_wall_s,
                     "clock": args.clock, "stopped": done.reason,
                     "step_s": step_s, "val_s": val_s, "checkpoint": str(done.checkpoint)}
            if done.checkpoint is None:
                entry["error"] = "no checkpoint (stopped before the first epoch ended)"
                results["runs"][run] = entry
                print(f"  no checkpoint: {done.reason}", flush=True)
                continue
            segmenter = Segmenter.load(done.checkpoint, device=args.device)
            got = sorted(segmenter.meta.data.get("val_groups") or [])
            if got != val_groups:
                raise SystemExit(f"{run}: the trainer held out {got}, not the reference split {val_groups}; "
                                 "the comparison would not be on one split.")
            fixed = trained_normalization(segmenter.meta)
            if fixed is not None:  # score the weights as they were trained (see accuracy.trained_normalization)
                segmenter.meta.normalization = fixed
                entry["evaluated_normalization"] = fixed
            summary, eval_s = evaluate_segmenter(segmenter, classes, samples)
            entry.update(summary)
            entry["eval_s"] = eval_s
            entry["params_m"] = sum(p.numel() for p in segmenter.model.parameters()) / 1e6
            results["runs"][run] = entry
            print(f"  -> {train_s:.0f} {args.clock} s ({train_wall_s:.0f} s wall) training, best epoch {done.best_epoch}: nucleus Dice {summary['nucleus_dice']:.4f} "
                  f"bPQ {summary['bpq']:.4f} mPQ {summary['mpq']:.4f} AJI {summary['aji']:.4f}", flush=True)
            json_path.write_text(json.dumps(results, indent=1))  # after every run: partial results survive
    results["total_s"] = time.time() - t_start
    json_path.write_text(json.dumps(results, indent=1))

    print_report(results, classes, json_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
