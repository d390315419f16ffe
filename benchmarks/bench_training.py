"""Training throughput: our trainer against a bare PyTorch loop, same model, batch and data.

Both sides train the same U-Net (same seed) on the same real CoNSeP crops through the same
augmentation and normalisation, with the same loss and optimizer; images/s are timed between
the end of the warm-up steps and the end of the last step (validation and checkpoint writing
at the epoch end are not in the window; everything per step is: the callback, the NaN check,
the scheduler). Runs alternate (ours, bare, ours, bare, ...) and the median of each side
is compared, so background load hits both alike.

    python benchmarks/bench_training.py [--encoder resnet18] [--crop 128] [--batch 8] [--steps 12]

On a GPU it also compares AMP + channels_last with fp32 and reports images/s of U-Net
ResNet34 and ResNet50 at 256x256. The last line is machine-readable: ``ratio=<ours/bare>``.

``--precision`` times instead one train step (forward, loss, backward, AdamW step) of the
default model (U-Net MobileNetV2 with a distance head, channels_last as configs/default.yaml)
in fp32 and under bf16 autocast (what ``amp: on`` does on a CPU), for each crop size, on real
CoNSeP crops: seconds per step and megapixels per second, fp32 and bf16 steps alternating so
background load hits both alike::

    python benchmarks/bench_training.py --precision [--crops 64,128,256] [--batch 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from napari_medseg.models import ModelConfig, build_model  # noqa: E402
from napari_medseg.training import BatchDone, load_train_config, train  # noqa: E402
from napari_medseg.training.data import PatchDataset, load_dataset_folders, normalization_stats  # noqa: E402
from napari_medseg.training.losses import build_loss  # noqa: E402

DATA = Path(os.environ.get("MEDSEG_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "consep_train"


def config(args, out_dir, encoder=None, crop=None, amp="off", channels_last="off", device="cpu"):
    return load_train_config(None, [
        "model.architecture=unet", f"model.encoder={encoder or args.encoder}", f"data.crop_size={crop or args.crop}",
        f"batch_size={args.batch}", f"data.samples_per_epoch={args.batch * (args.steps + args.warmup)}",
        "data.val_fraction=0", "epochs=1", "lr=0.001", "loss=ce_dice", "optimizer=adamw", f"amp={amp}",
        f"channels_last={channels_last}", f"device={device}", f"num_threads={args.threads}", f"out_dir={out_dir}",
    ])


def run_ours(cfg, items, warmup: int) -> float:
    stamps = []

    def on_update(update):
        if isinstance(update, BatchDone):
            if update.step >= warmup:
                if torch.cuda.is_available() and cfg.device != "cpu":
                    torch.cuda.synchronize()
                stamps.append(time.perf_counter())

    train(cfg, on_update=on_update, items=items)
    return cfg.batch_size * (len(stamps) - 1) / (stamps[-1] - stamps[0])


def run_bare(cfg, items, warmup: int) -> float:
    """The loop everyone writes: DataLoader -> forward -> loss -> zero_grad -> backward -> step."""
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    mc = ModelConfig(**{**cfg.model.to_dict(), "num_classes": len(items[1])})
    model = build_model(mc).to(device).train()
    torch.manual_seed(cfg.seed)
    mean, std = normalization_stats(cfg.normalization)
    ds = PatchDataset(items[0], cfg.data.crop_size, 1, cfg.augment, mean=mean, std=std)
    sampler = torch.utils.data.RandomSampler(ds, num_samples=cfg.data.samples_per_epoch)
    loader = DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=True)
    loss_fn = build_loss(cfg.loss, num_classes=len(items[1]))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    stamps = []
    for step, (x, y) in enumerate(loader, 1):
        x, y = x.to(device), y.to(device)
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
    return cfg.batch_size * (len(stamps) - 1) / (stamps[-1] - stamps[0])


def step_seconds(model, optimizer, loss_fn, batches, precision) -> list[float]:
    """Wall time of each train step over ``batches`` (image, labels, distance), with the
    trainer's ``Precision`` (its autocast and memory format)."""
    times = []
    for image, labels, distance in batches:
        started = time.perf_counter()
        with precision.autocast():
            logits = model(precision.prepare(image))
        loss = loss_fn(logits.float(), labels, distance)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return times


def precision_sweep(args, items) -> None:
    """fp32 vs bf16 autocast per crop size: the median step of ``rounds`` alternating runs."""
    from napari_medseg.training.losses import WithDistanceHead
    from napari_medseg.training.network import Precision, cpu_has_bf16_matrix_units

    print(f"CPU ({os.cpu_count()} cores seen), {args.threads} torch threads, AMX (bf16 matrix units): "
          f"{cpu_has_bf16_matrix_units()}, torch's CPU capability {torch.backends.cpu.get_cpu_capability()}; "
          f"U-Net MobileNetV2 + distance head, channels_last, batch {args.batch}, {args.steps} timed steps "
          f"after {args.warmup} warm-up per run, {args.rounds} rounds")
    print(f"{'crop':>6} {'fp32 s/step':>12} {'bf16 s/step':>12} {'bf16 speed-up':>14} {'fp32 Mpx/s':>11} {'bf16 Mpx/s':>11}")
    for crop in args.crops:
        mc = ModelConfig("unet", "mobilenet_v2", num_classes=len(items[1]), distance_head=True)
        mean, std = normalization_stats("none")
        ds = PatchDataset(items[0], crop, 1, None, mean=mean, std=std, distance_targets=True)
        loader = DataLoader(ds, batch_size=args.batch, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(0))
        batches = [b for b, _ in zip(loader, range(args.steps + args.warmup))]
        loss_fn = WithDistanceHead(build_loss("ce_dice", num_classes=len(items[1])), len(items[1]))
        medians = {}
        for amp in (False, True) * args.rounds:
            torch.manual_seed(0)
            model = build_model(mc).to(memory_format=torch.channels_last).train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            times = step_seconds(model, optimizer, loss_fn, batches, Precision(amp, True, "cpu"))[args.warmup:]
            medians.setdefault(amp, []).append(statistics.median(times))
        fp32, bf16 = statistics.median(medians[False]), statistics.median(medians[True])
        mpx = args.batch * crop * crop / 1e6
        print(f"{crop:>5}² {fp32:>12.3f} {bf16:>12.3f} {fp32 / bf16:>13.2f}x {mpx / fp32:>11.3f} {mpx / bf16:>11.3f}",
              flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=12, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="alternating runs per side")
    p.add_argument("--images", type=int, default=96, help="CoNSeP patches to train on")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--precision", action="store_true", help="time fp32 vs bf16 autocast steps per crop size instead")
    p.add_argument("--crops", type=lambda text: [int(v) for v in text.split(",")], default=[64, 128, 256],
                   help="crop sizes for --precision (comma-separated)")
    args = p.parse_args(argv)

    items, classes = load_dataset_folders([str(DATA)], r"^(.*)_\d+$")
    items = (items[:args.images], classes)
    if args.precision:
        torch.set_num_threads(args.threads)
        precision_sweep(args, items)
        return 0
    print(f"CPU, {args.threads} threads: U-Net {args.encoder}, {args.crop}x{args.crop} crops, batch {args.batch}, "
          f"{args.steps} timed steps after {args.warmup} warm-up, {args.rounds} alternating rounds, "
          f"{args.images} real CoNSeP patches (augmented)")
    ours, bare = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            ours.append(run_ours(config(args, Path(tmp) / f"o{r}"), items, args.warmup))
            torch.set_num_threads(args.threads)
            bare.append(run_bare(config(args, Path(tmp) / f"b{r}"), items, args.warmup))
            print(f"  round {r + 1}: ours {ours[-1]:.2f} img/s   bare loop {bare[-1]:.2f} img/s", flush=True)
        mo, mb = statistics.median(ours), statistics.median(bare)
        print(f"median: ours {mo:.2f} img/s, bare loop {mb:.2f} img/s, ours/bare = {mo / mb:.3f}")
        if torch.cuda.is_available():
            gpu = argparse.Namespace(**{**vars(args), "batch": 16, "steps": 30, "warmup": 5})
            name = torch.cuda.get_device_name()
            fp32 = run_ours(config(gpu, Path(tmp) / "g32", "resnet34", 256, "off", "off", "cuda"), items, gpu.warmup)
            fast = run_ours(config(gpu, Path(tmp) / "gamp", "resnet34", 256, "on", "on", "cuda"), items, gpu.warmup)
            print(f"{name}: U-Net ResNet34 256x256 batch 16: fp32 {fp32:.1f} img/s, AMP + channels_last "
                  f"{fast:.1f} img/s ({fast / fp32:.2f}x)")
            r50 = run_ours(config(gpu, Path(tmp) / "g50", "resnet50", 256, "on", "on", "cuda"), items, gpu.warmup)
            print(f"{name}: U-Net ResNet50 256x256 batch 16, AMP + channels_last: {r50:.1f} img/s")
    print(f"ratio={mo / mb:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
