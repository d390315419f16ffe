"""Tiled inference: our engine against MONAI's ``sliding_window_inference``, then a whole-slide stream.

Part 1, in one process, same model (the shipped default), same tile, overlap, batch and
gaussian blending (sigma = tile/8 in both), on a 4096² image assembled from real CoNSeP
H&E patches: a per-batch table of the backends (PyTorch, and the ONNX export through
OpenVINO / ONNX Runtime where installed, also int8 where it loads), then whole-image rows for
each backend and for MONAI: throughput (Mpx/s), peak RSS increase during the call, class-map
agreement with our float32 PyTorch run, and the ratios (ours with the backend ``auto`` picks / MONAI's). Both
sides compute the same thing: the softmax of the class channels (a distance head's channel
is no class) and the model's decision rule (``classify``: its tuned foreground threshold).
Both timings include everything from the uint8 image to the uint8 class map. Ours runs
without glass skipping here so that both do the same work; a last row shows our defaults.

Part 2 writes a tiled 20,000² TIFF (real H&E patches on a tissue-shaped region, glass
elsewhere, as on a slide), opens it lazily and streams it through the engine with the
default settings, printing peak RSS.

    pip install -e ".[bench,openvino,onnxruntime]"     # MONAI (this script only) and the runtimes
    python benchmarks/bench_inference.py [--size 4096] [--stream-size 20000] [--threads 2] [--rounds 3] [--rows ...]

The last line is machine-readable:
``ratio_throughput=<x> ratio_memory=<y> agreement=<z> stream_peak_rss_gb=<g>``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATA = Path(os.environ.get("MEDSEG_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the resident set size every 10 ms in a thread; ``increase`` = peak - start.

    (Every 2 ms, the sampler itself cost the measured runs a few per cent on 2 cores.)"""

    def __enter__(self):
        gc.collect()
        try:  # hand freed heap back to the OS, so earlier runs do not lend memory to this one
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.010):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.increase = self.peak - self.start


def consep_mosaic(size: int, seed: int = 0) -> np.ndarray:
    """A ``size``² RGB uint8 image of real CoNSeP 256² patches in random order."""
    from napari_medseg.io import read_image

    files = sorted((DATA / "consep_train" / "images").glob("*.png"))
    if not files:
        raise SystemExit(f"No CoNSeP images in {DATA / 'consep_train'} (set MEDSEG_DATA).")
    rng = np.random.default_rng(seed)
    n = -(-size // 256)
    picks = rng.choice(len(files), n * n, replace=len(files) < n * n)
    patches = [read_image(files[i]) for i in picks]
    rows = [np.concatenate(patches[r * n:(r + 1) * n], axis=1) for r in range(n)]
    return np.ascontiguousarray(np.concatenate(rows, axis=0)[:size, :size])


def run_ours(segmenter, image, settings):
    from napari_medseg.steps import run_steps

    return run_steps(segmenter.iter_segment(image, settings))


def run_monai(model, segmenter, image, tile, overlap, batch):
    """MONAI's sliding window computing what our engine computes: the softmax of the class
    channels only (a distance head's channel is no class), blended, then our decision rule
    (``classify`` with the model's foreground threshold)."""
    import torch
    from monai.inferers import sliding_window_inference

    from napari_medseg.inference import classify

    n = len(segmenter.classes)
    model = model.eval()
    x = torch.from_numpy(segmenter.normalise(image)).permute(2, 0, 1)[None]
    if next(model.parameters()).is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        probs = sliding_window_inference(
            x, roi_size=(tile, tile), sw_batch_size=batch,
            predictor=lambda t: torch.softmax(model(t)[:, :n], dim=1),
            overlap=overlap / tile, mode="gaussian", sigma_scale=0.125, padding_mode="reflect",
        )
        return classify(probs[0].numpy(), segmenter.foreground_threshold).astype(np.uint8)


def load_backends(device: str, precision: str = "auto", names=("torch", "openvino", "onnxruntime")) -> dict:
    """One segmenter per backend that loads as itself, at ``precision``, here (a runtime not
    installed, or a precision it does not keep, is left out with its reason)."""
    from napari_medseg.inference import Segmenter

    loaded = {}
    for name in names:
        seg = Segmenter.load("default", device=device, backend=name, precision=precision)
        if seg.backend.name == name and precision in ("auto", seg.backend.precision):
            loaded[name if precision in ("auto", "fp32") else f"{name} {precision}"] = seg
        else:
            print(f"backend {name} {precision}: not used ({'; '.join(seg.backend.notes)})")
    return loaded


def per_batch_table(segmenters: dict, image: np.ndarray, tile: int, batch: int, repeats: int = 7) -> None:
    """Best time of one batch of ``batch`` normalised real tiles through each backend's network."""
    import torch

    first = next(iter(segmenters.values()))
    tiles = np.stack([first.normalise(image[i * tile:(i + 1) * tile, :tile]) for i in range(batch)])
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    print(f"per batch ({batch} x {tile}², best of {repeats}):")
    reference = None
    for name, seg in segmenters.items():
        run = seg.model if seg.backend.name == "torch" else seg.backend
        times = []
        with torch.inference_mode():
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                logits = run(x)
                times.append(time.perf_counter() - t0)
        n = len(seg.classes)
        labels = logits[:, :n].argmax(1)
        reference = labels if reference is None else reference
        print(f"  {name:>17} {seg.backend.precision:>5}: {min(times[1:]):6.3f} s  "
              f"argmax agreement with torch {100 * float((labels == reference).float().mean()):.3f}%")


def time_engines(engines: list, rounds: int, mpx: float) -> dict[str, tuple]:
    """``{name: (class map, best seconds, largest peak RSS increase)}`` over interleaved rounds.

    The fastest time of each engine is its figure (timeit's rule: noise from other processes
    only ever adds time); the largest memory increase is kept."""
    results: dict[str, tuple] = {}
    for round_ in range(1, rounds + 1):
        for name, fn in engines:
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                labels = fn()
                seconds = time.perf_counter() - t0
            print(f"round {round_} {name:>15}: {seconds:7.1f} s  {mpx / seconds:6.3f} Mpx/s  "
                  f"peak RSS +{mem.increase / 2**20:7.1f} MB", flush=True)
            old = results.get(name)
            results[name] = (labels, min(seconds, old[1]) if old else seconds,
                             max(mem.increase, old[2]) if old else mem.increase)
    return results


def write_slide(path: Path, size: int, seed: int = 0) -> float:
    """A tiled, compressed ``size``² RGB TIFF written tile by tile; returns the tissue share."""
    import tifffile

    from napari_medseg.io import read_image

    files = sorted((DATA / "consep_train" / "images").glob("*.png"))
    patches = [read_image(f) for f in files[:64]]
    rng = np.random.default_rng(seed)
    glass = np.clip(rng.normal(242, 3, (256, 256, 3)), 0, 255).astype(np.uint8)
    n = -(-size // 256)
    centre, radius = (n - 1) / 2, n * 0.28  # a round tissue section, ~25% of the slide
    tissue = [(r - centre) ** 2 + (c - centre) ** 2 <= radius ** 2 for r in range(n) for c in range(n)]

    def tiles():
        for k, inside in enumerate(tissue):
            yield patches[k % len(patches)] if inside else glass

    tifffile.imwrite(path, tiles(), shape=(n * 256, n * 256, 3), dtype=np.uint8, tile=(256, 256),
                     compression="zlib", photometric="rgb", bigtiff=True)
    return float(np.mean(tissue))


def stream(args) -> None:
    """Part 2: write a whole slide, open it lazily, segment it with the defaults; peak RSS."""
    import resource

    import torch

    from napari_medseg.inference import Segmenter, TileSettings
    from napari_medseg.io.lazy import open_tiff_lazy

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "slide.tif"
        t0 = time.perf_counter()
        share = write_slide(path, args.stream_size)
        print(f"stream: wrote a {args.stream_size}² slide ({path.stat().st_size / 2**20:.0f} MB on disk, "
              f"tissue {100 * share:.0f}%) in {time.perf_counter() - t0:.0f} s, in a fresh process")
        segmenter = Segmenter.load("default", device=args.device, backend="auto")
        lazy = open_tiff_lazy(path)[0]
        before_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # writing the slide, loading
        t0 = time.perf_counter()
        with PeakRSS() as segmenting:
            labels = run_ours(segmenter, lazy, TileSettings(args.tile, args.overlap, args.batch_size))
        seconds = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's lifetime peak
        report = segmenter.last_report
        print(f"stream: backend {report.backend} ({report.precision}), {lazy.shape[0]}x{lazy.shape[1]} in {seconds:.0f} s "
              f"({lazy.shape[0] * lazy.shape[1] / 1e6 / seconds:.2f} Mpx/s), {report.tiles} tiles, "
              f"{report.skipped_background} skipped as glass; process peak RSS {peak / 2**30:.2f} GB "
              f"(before segmenting {segmenting.start / 2**30:.2f} GB, peak while segmenting "
              f"{segmenting.peak / 2**30:.2f} GB, peak while writing the slide and loading the model "
              f"{before_peak / 2**30:.2f} GB; the uint8 class map is {labels.nbytes / 2**30:.2f} GB)")
        print(f"stream_peak_rss_gb={peak / 2**30:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--stream-size", type=int, default=20000, help="0 skips the whole-slide stream")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", default="", help="whole-image rows to time, comma-separated, of torch, openvino, "
                        "onnxruntime, 'openvino int8', 'onnxruntime int8', 'openvino fp16', 'openvino bf16', monai, "
                        "monai+, defaults (default: all; "
                        "auto's backend and monai always run)")
    parser.add_argument("--stream-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; the best time counts")
    args = parser.parse_args()

    if args.stream_only:
        stream(args)
        return

    import torch

    from napari_medseg.inference import Segmenter, TileSettings
    from napari_medseg.models import load_checkpoint, resolve_model_path

    if args.threads:
        torch.set_num_threads(args.threads)
    backends = load_backends(args.device, "fp32")  # ours: batch norm folded, conv+activation fused, channels-last
    # int8 (asked for, never auto's: see inference.backends; mixed by the default's plan)
    backends.update(load_backends(args.device, "int8", ("openvino", "onnxruntime")))
    for half in ("bf16", "fp16"):  # OpenVINO's half precisions, where this CPU offers them (auto may take one)
        backends.update(load_backends(args.device, half, ("openvino",)))
    auto = Segmenter.load("default", device=args.device, backend="auto")
    auto_key = auto.backend.name + ("" if auto.backend.precision == "fp32" else f" {auto.backend.precision}")
    backends[auto_key] = auto  # the same engine as that row: one warm-up, one compiled model
    segmenter = backends["torch"]
    plain_model = load_checkpoint(resolve_model_path("default"), device=segmenter.device)[0].eval()  # as a user has it
    print(f"model: {segmenter.meta.model.architecture} {segmenter.meta.model.encoder}, device {segmenter.device}, "
          f"torch threads {torch.get_num_threads()}, tile {args.tile}, overlap {args.overlap}, batch {args.batch_size}, "
          f"foreground threshold {segmenter.foreground_threshold}; auto picks {auto.backend.name} "
          f"({auto.backend.precision}){': ' + '; '.join(auto.backend.notes) if auto.backend.notes else ''}")
    image = consep_mosaic(args.size)
    mpx = image.shape[0] * image.shape[1] / 1e6
    per_batch_table(backends, image, args.tile, args.batch_size)
    same_work = TileSettings(args.tile, args.overlap, args.batch_size, skip_background=False)
    rows = set(args.rows.split(",")) | {auto_key, "monai"} if args.rows else None  # the ratios need both
    timed = {name: seg for name, seg in backends.items() if rows is None or name in rows}
    # warm-up: first calls pay for kernel selection and allocator growth
    for seg in timed.values():
        run_ours(seg, image[:512, :512], same_work)
    run_monai(plain_model, segmenter, image[:512, :512], args.tile, args.overlap, args.batch_size)

    engines = [(f"ours[{name}]", lambda seg=seg: run_ours(seg, image, same_work)) for name, seg in timed.items()]
    engines += [("monai", lambda: run_monai(plain_model, segmenter, image, args.tile, args.overlap, args.batch_size)),
                # MONAI handed our optimised model: what is left is the engines' own difference
                ("monai+", lambda: run_monai(segmenter.model, segmenter, image, args.tile, args.overlap,
                                             args.batch_size)),
                ("ours[auto], glass skipping on (default)",
                 lambda: run_ours(auto, image, TileSettings(args.tile, args.overlap, args.batch_size)))]
    short = {"monai": "monai", "monai+": "monai+", "ours[auto], glass skipping on (default)": "defaults"}
    engines = [(name, fn) for name, fn in engines if rows is None or short.get(name, name[5:-1]) in rows]
    results = time_engines(engines, args.rounds, mpx)
    ref_name = "ours[torch]" if "ours[torch]" in results else f"ours[{auto_key}]"
    for name, (labels, seconds, increase) in results.items():
        print(f"{name:>15}: best {seconds:7.1f} s  {mpx / seconds:6.3f} Mpx/s  peak RSS +{increase / 2**20:7.1f} MB  "
              f"agreement with {ref_name} {100 * float((labels == results[ref_name][0]).mean()):.3f}%")
    if "ours[auto], glass skipping on (default)" in results:
        print(f"glass tiles skipped with the defaults: {auto.last_report.skipped_background}/{auto.last_report.tiles}")
    ours, monai = results[f"ours[{auto_key}]"], results["monai"]
    ratio_throughput = monai[1] / ours[1]
    ratio_memory = ours[2] / max(monai[2], 1)
    agreement = float((ours[0] == monai[0]).mean())
    print("monai+ = MONAI running our inference-optimised model (batch norm folded, conv+activation fused, channels-last)")
    print(f"auto = {auto.backend.name} ({auto.backend.precision}): throughput ratio (ours/MONAI) {ratio_throughput:.2f}x, "
          f"memory ratio {ratio_memory:.3f}, class-map agreement with MONAI {100 * agreement:.3f}%")

    stream_gb = float("nan")
    if args.stream_size:
        # A fresh process, as `medseg predict` would be: its peak RSS is the whole truth
        # (imports, model, engine, result), untouched by part 1's heap.
        cmd = [sys.executable, __file__, "--stream-only", "--stream-size", str(args.stream_size), "--tile", str(args.tile),
               "--overlap", str(args.overlap), "--batch-size", str(args.batch_size), "--threads", str(args.threads),
               "--device", args.device]
        child = subprocess.run(cmd, capture_output=True, text=True, check=True)
        for line in child.stdout.splitlines():
            if line.startswith("stream_peak_rss_gb="):
                stream_gb = float(line.split("=", 1)[1])
            else:
                print(line)
    print(f"ratio_throughput={ratio_throughput:.3f} ratio_memory={ratio_memory:.4f} agreement={agreement:.5f} "
          f"stream_peak_rss_gb={stream_gb:.3f}")


if __name__ == "__main__":
    main()
