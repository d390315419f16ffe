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

from accuracy import DATA, format_table  # noqa: E402

from napari_medseg.evaluation.benchmark import evaluate_baseline, evaluate_segmenter, trained_normalization  # noqa: E402
from napari_medseg.evaluation.threshold import samples_of_groups  # noqa: E402
from napari_medseg.io.dataset import GROUP_PATTERN, open_dataset  # noqa: E402

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


def _parser() -> argparse.ArgumentParser:
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
    return parser


def _centre_cropped_items(data: str, val_groups: list[str], size: int):
    """The training data with every validation image cut to its centre ``size`` crop (cheaper checkpoint choice)."""
    from napari_medseg.training.data import load_dataset_folders

    data_items, data_classes = load_dataset_folders([data], GROUP_PATTERN, 3)
    for it in data_items:
        if it.group in val_groups:
            h, w = it.labels.shape
            c = min(size, h, w)
            y, x = (h - c) // 2, (w - c) // 2
            it.image, it.labels = it.image[y:y + c, x:x + c].copy(), it.labels[y:y + c, x:x + c].copy()
            if it.instances is not None:  # the validation bPQ needs them cut alike
                it.instances = it.instances[y:y + c, x:x + c].copy()
    return data_items, data_classes


def _plan_epochs(plan, arch: str, cfg) -> tuple[int, float | None, float, float]:
    """(epochs, stop after this many seconds or None, seconds per step, seconds per validation) of one run."""
    args = plan.args
    if args.epochs:
        return args.epochs, None, float("nan"), float("nan")
    if arch not in plan.timings:  # timed once per architecture: both losses get the same epochs
        plan.timings[arch] = time_model(cfg, plan.n_train, plan.n_val, plan.clock, val_size=args.val_crop or 256)
    step_s, val_s = plan.timings[arch]
    per_epoch = plan.steps_per_epoch(cfg) * step_s + val_s
    return max(1, int((args.budget_s - 5.0) // per_epoch)), HARD_CAP * args.budget_s, step_s, val_s


def _epoch_printer(update) -> None:
    if type(update).__name__ == "EpochDone":
        m = update.metrics
        print(f"  epoch {update.epoch}/{update.epochs} train_loss {update.train_loss:.4f} "
              f"val_loss {update.val_loss:.4f} val_nucleus_dice {m.get('nucleus_dice', float('nan')):.4f} "
              f"val_mean_class_dice {m.get('mean_dice', float('nan')):.4f} {'*' if update.best else ''} "
              f"{update.seconds:.0f}s", flush=True)


def _train_run(plan, arch: str, loss: str) -> dict:
    """Train one architecture x loss within the budget and score its best checkpoint; the results entry."""
    from napari_medseg.training import load_train_config, train

    args, run = plan.args, f"{arch}/{loss}"
    out_dir = Path(args.out) / f"{arch}_{loss}"
    overrides = LOSSES[loss] + [
        f"data.dataset=[{args.data}]", f"data.crop_size={args.crop}", f"batch_size={args.batch_size}",
        f"num_threads={args.threads}", f"device={args.device}", f"out_dir={out_dir}", f"seed={plan.split_seed}",
        f"data.val_fraction={plan.val_fraction}", *args.set,
    ]
    cfg = load_train_config(REPO / ARCHITECTURES[arch], overrides)
    epochs, limit, step_s, val_s = _plan_epochs(plan, arch, cfg)
    cfg.epochs = epochs
    cfg.model_card = (cfg.model_card + f" Budget: {plan.budget_text} ({epochs} epochs) on {args.device} "
                      f"with {args.threads} thread(s): a small-budget comparison run, not a finished model.")
    print(f"\n[{run}] {epochs} epoch(s) of {plan.steps_per_epoch(cfg)} steps"
          + (f" (timed {step_s:.2f} s/step, {val_s:.1f} s/validation)" if not args.epochs else ""), flush=True)
    t0, wall0 = plan.clock(), time.time()
    try:
        done = train(cfg, on_update=_epoch_printer, items=plan.items,
                     should_stop=lambda: limit is not None and plan.clock() - t0 > limit)
    except Exception as exc:  # one failing run must not lose the others
        print(f"  FAILED: {type(exc).__name__}: {exc}", flush=True)
        return {"error": f"{type(exc).__name__}: {exc}"}
    entry = {"arch": arch, "loss": loss, "epochs_planned": epochs, "best_epoch": done.best_epoch,
             "epochs_done": len(done.history), "train_s": plan.clock() - t0, "train_wall_s": time.time() - wall0,
             "clock": args.clock, "stopped": done.reason,
             "step_s": step_s, "val_s": val_s, "checkpoint": str(done.checkpoint)}
    if done.checkpoint is None:
        entry["error"] = "no checkpoint (stopped before the first epoch ended)"
        print(f"  no checkpoint: {done.reason}", flush=True)
        return entry
    _score_run(plan, run, done.checkpoint, entry)
    return entry


def _score_run(plan, run: str, checkpoint, entry: dict) -> None:
    """Score a run's checkpoint on the validation split, into ``entry``."""
    from napari_medseg.inference import Segmenter

    segmenter = Segmenter.load(checkpoint, device=plan.args.device)
    got = sorted(segmenter.meta.data.get("val_groups") or [])
    if got != plan.val_groups:
        raise SystemExit(f"{run}: the trainer held out {got}, not the reference split {plan.val_groups}; "
                         "the comparison would not be on one split.")
    fixed = trained_normalization(segmenter.meta)
    if fixed is not None:  # score the weights as they were trained (see evaluation.benchmark.trained_normalization)
        segmenter.meta.normalization = fixed
        entry["evaluated_normalization"] = fixed
    summary, eval_s = evaluate_segmenter(segmenter, plan.classes, plan.samples)
    entry.update(summary)
    entry["eval_s"] = eval_s
    entry["params_m"] = sum(p.numel() for p in segmenter.model.parameters()) / 1e6
    print(f"  -> {entry['train_s']:.0f} {plan.args.clock} s ({entry['train_wall_s']:.0f} s wall) training, best epoch "
          f"{entry['best_epoch']}: nucleus Dice {summary['nucleus_dice']:.4f} "
          f"bPQ {summary['bpq']:.4f} mPQ {summary['mpq']:.4f} AJI {summary['aji']:.4f}", flush=True)


class _Plan:
    """What every run shares: the arguments, the validation split, the clock and budget."""

    def __init__(self, args, parser):
        from napari_medseg.inference import Segmenter

        self.args, self.timings = args, {}
        reference = Segmenter.load(args.split_from_model, device="cpu").meta
        self.val_groups = sorted(reference.data.get("val_groups") or [])
        if not self.val_groups:
            parser.error(f"{args.split_from_model} names no validation groups")
        self.split_seed = reference.training.get("config", {}).get("seed", 0)
        self.val_fraction = reference.training.get("config", {}).get("data", {}).get("val_fraction", 0.15)
        self.classes, self.samples = samples_of_groups(args.data, self.val_groups)
        self.n_val = len(self.samples)
        self.n_train = len(open_dataset(args.data).stems) - self.n_val
        self.clock = time.process_time if args.clock == "cpu" else time.perf_counter
        self.budget_text = f"{args.epochs} epochs" if args.epochs else f"{args.budget_s:.0f} {args.clock} s"
        self.items = None

    def steps_per_epoch(self, cfg) -> int:
        return max(1, math.ceil(self.n_train * cfg.data.crops_per_image / cfg.batch_size))


def _choices(parser, text: str, known: dict) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if bad:
        parser.error(f"unknown: {', '.join(bad)} (choose from {', '.join(known)})")
    return names


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.report:
        results = json.loads(Path(args.report).read_text())
        ok = [r for r in results["runs"].values() if "per_class" in r]
        classes = ["background", *(ok[0]["per_class"] if ok else results["baseline"]["per_class"])]
        print_report(results, classes)
        return 0

    import torch

    torch.set_num_threads(args.threads)
    archs, losses = _choices(parser, args.archs, ARCHITECTURES), _choices(parser, args.losses, LOSSES)
    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    json_path = Path(args.json) if args.json else out_root / "results.json"
    plan = _Plan(args, parser)
    print(f"data {args.data}: {plan.n_train} training / {plan.n_val} validation images; "
          f"validation groups {', '.join(plan.val_groups)}")
    print(f"budget per run: {plan.budget_text}; crop {args.crop}, batch {args.batch_size}, {args.threads} thread(s), "
          f"device {args.device}; {len(archs) * len(losses)} runs", flush=True)
    if args.val_crop:
        plan.items = _centre_cropped_items(args.data, plan.val_groups, args.val_crop)

    baseline, _ = evaluate_baseline(plan.classes, plan.samples)
    results = {"settings": {**vars(args), "val_groups": plan.val_groups, "n_train": plan.n_train, "n_val": plan.n_val,
                            "torch": torch.__version__, "budget": plan.budget_text},
               "baseline": baseline, "runs": {}}
    t_start = time.time()
    for arch in archs:
        for loss in losses:
            results["runs"][f"{arch}/{loss}"] = _train_run(plan, arch, loss)
            if "nucleus_dice" in results["runs"][f"{arch}/{loss}"]:
                json_path.write_text(json.dumps(results, indent=1))  # after every scored run: partial results survive
    results["total_s"] = time.time() - t_start
    json_path.write_text(json.dumps(results, indent=1))

    print_report(results, plan.classes, json_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
