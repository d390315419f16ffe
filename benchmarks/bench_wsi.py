"""A whole synthetic slide segmented end to end, as ``medseg predict SLIDE --whole-slide`` does.

Writes a tiled pyramidal TIFF (JPEG-free, zlib) of ``--width x --height`` px at 0.25 µm/px: glass
everywhere but ``--tissue`` of the 2048-px cells, which hold real CoNSeP H&E patches (a
different patch per 256² cell). The slide is written tile by tile, so making it costs no
memory either. Then ``inference.slide.predict_slide``: tissue found on a low level, the model
over tissue blocks only, nuclei stitched block by block, GeoJSON + CSV + label pyramids.

Prints: slide size, tissue share, seconds per phase, tissue Mpx/s, peak RSS over the run
(sampled every 20 ms), nuclei per class. Nothing downloads.

``--viewer``: the same from napari's Segment widget instead, as a user does it: the slide opened
by the reader, a rectangle drawn over ``--region X,Y,W,H`` (level-0 px; default the whole slide),
the run in its own process writing to the results folder, the results shown as lazy label
pyramids (peak RSS: the viewer's process and the run's together).
A 10 ms QTimer on the GUI thread measures the GUI stall: its largest gap while the worker runs,
and while the finished results are added as layers, until the Run button is back (needs a
display: xvfb-run). A gap is the stall plus at most one interval.

    python benchmarks/bench_wsi.py --width 16384 --height 12288 --threads 2        # as run here (CPU)
    xvfb-run -a python benchmarks/bench_wsi.py --viewer --width 8192 --height 8192 --region 2048,2048,4096,4096
    python benchmarks/bench_wsi.py --width 61440 --height 40960 --device cuda      # the issue's 40x size
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from napari_medseg.inference.settings import BACKENDS  # noqa: E402

DATA = Path(os.environ.get("MEDSEG_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
CELL = 2048  # tissue is placed in cells of this size (a segmentation block)
TILE = 512  # TIFF tile
GLASS = 242


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def children(pid: int) -> list[int]:
    """``pid``'s child processes, and theirs (the viewer's slide run is a child process)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found + [g for c in found for g in children(c)]


def tree_rss_bytes() -> tuple[int, int]:
    """The resident sets of this process and of its children (together)."""
    kids = 0
    for pid in children(os.getpid()):
        try:
            kids += rss_bytes(pid)
        except OSError:  # it has just ended
            continue
    return rss_bytes(), kids


class PeakRSS:
    """The largest resident set size, of this process and its children together (``peak``), and
    of each alone (``own_peak``, ``children_peak``), seen while inside the block (every 20 ms)."""

    def __enter__(self):
        self.peak = self.own_peak = self.children_peak = 0
        self._stop = threading.Event()
        self._take()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _take(self):
        own, kids = tree_rss_bytes()
        self.peak, self.own_peak = max(self.peak, own + kids), max(self.own_peak, own)
        self.children_peak = max(self.children_peak, kids)

    def _sample(self):
        while not self._stop.wait(0.02):
            self._take()

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def tissue_cells(height: int, width: int, share: float, seed: int = 0) -> np.ndarray:
    """Which CELL-sized cells hold tissue: a blob of about ``share`` of the cells."""
    rows, cols = -(-height // CELL), -(-width // CELL)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:rows, :cols]
    score = -(((yy - rows / 2) / rows) ** 2 + ((xx - cols / 2) / cols) ** 2) + rng.normal(0, 0.03, (rows, cols))
    return score >= np.quantile(score, 1 - share)


def patches() -> list[np.ndarray]:
    from napari_medseg.io.dataset import open_dataset

    ds = open_dataset(DATA / "consep_train")
    return [ds.load(stem).image for stem in ds.stems[:64]]


def level_tiles(cells: np.ndarray, tissue: list[np.ndarray], height: int, width: int, step: int):
    """Tiles of the slide at downsample ``step`` (1, 4, 16, ...), made from level 0 on the fly."""
    for y in range(0, -(-height // step), TILE):
        for x in range(0, -(-width // step), TILE):
            yield region(cells, tissue, y * step, x * step, TILE * step, height, width, step)


def region(cells, tissue, y0: int, x0: int, side: int, height: int, width: int, step: int = 1) -> np.ndarray:
    """Level-0 px ``[y0, y0 + side)²`` at downsample ``step`` (dividing 256): each 256² patch is
    subsampled before it is placed, so a coarse tile never builds its level-0 block (a 64x tile's
    would be 32768² x 3 bytes: the writer peaked at 6.4 GB for a 61440 x 40960 slide)."""
    out = np.full((side // step, side // step, 3), GLASS, np.uint8)
    for y in range(y0, min(y0 + side, height), 256):
        for x in range(x0, min(x0 + side, width), 256):
            if cells[y // CELL, x // CELL]:
                patch = tissue[(y // 256 * 7 + x // 256) % len(tissue)][::step, ::step]
                top, left = (y - y0) // step, (x - x0) // step
                out[top:top + patch.shape[0], left:left + patch.shape[1]] = patch
    return out


def write_slide(path: Path, height: int, width: int, share: float) -> float:
    import tifffile

    cells, tissue = tissue_cells(height, width, share), patches()
    steps = [4 ** i for i in range(4) if max(height, width) // 4 ** i >= 256]
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for i, step in enumerate(steps):
            shape = (-(-height // step), -(-width // step), 3)
            extra = ({"subifds": len(steps) - 1, "metadata": {"axes": "YXS"}, "resolution": (1e4 / 0.25, 1e4 / 0.25),
                      "resolutionunit": "CENTIMETER"} if i == 0 else {"subfiletype": 1})
            tw.write(level_tiles(cells, tissue, height, width, step), shape=shape, dtype=np.uint8,
                     tile=(TILE, TILE), compression="zlib", **extra)
    return float(cells.mean())


TICK_MS = 10  # the GUI stall's clock: a gap is the stall plus up to one tick


def segment_in_viewer(slide_path: Path, out: Path, args) -> None:
    """The slide segmented from the Segment widget in a shown viewer; prints the GUI stall."""
    import napari
    from qtpy.QtCore import QEventLoop, QTimer

    from napari_medseg._napari.segment_widget import FILE_MODEL, SHAPE, WHOLE_SLIDE

    viewer = napari.Viewer(show=True)
    viewer.window.resize(1600, 1000)
    (layer,) = viewer.open(str(slide_path), plugin="napari-medseg")
    _, widget = viewer.window.add_plugin_dock_widget("napari-medseg", "Segment")
    widget.device.value, widget.tile_size.value, widget.results_folder.value = args.device, args.tile, out
    widget.backend.value = args.backend
    if args.model != "default":
        widget.model_source.value, widget.checkpoint.value = FILE_MODEL, args.model
    if args.region:
        x, y, w, h = (int(v) for v in args.region.split(","))
        corners = np.array([[y, x], [y, x + w], [y + h, x + w], [y + h, x]], float) - 0.5  # pixel edges
        shapes = viewer.add_shapes([corners * np.asarray(layer.scale) + np.asarray(layer.translate)],
                                   shape_type="rectangle", name="region", units=layer.units)  # in µm, as the slide
        widget.target.value, widget.shapes_layer.value = SHAPE, shapes
    else:
        widget.target.value = WHOLE_SLIDE
    settle = QEventLoop()  # the viewer paints its layers first, as it has long done when a user clicks Segment
    QTimer.singleShot(2000, settle.quit)
    settle.exec()
    ticks, steps, loop = [], [], QEventLoop()
    timer = QTimer()
    timer.setInterval(TICK_MS)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    with PeakRSS() as rss:
        start_rss, t0 = rss_bytes(), time.perf_counter()
        set_running = widget._set_running

        def running(now: bool) -> None:  # the run ends when the Run button is back: its layers are all in
            set_running(now)
            if not now:
                loop.quit()

        widget._set_running = running
        worker = widget.run()
        worker.yielded.connect(lambda _: steps.append(time.perf_counter()))
        loop.exec()
        seconds = time.perf_counter() - t0
    timer.stop()
    result = widget.last_slide_result
    if result is None or not steps:
        raise SystemExit(f"the run failed: {widget.status.value}")
    _print_result(result, seconds, rss, start_rss, f"from the viewer (device {widget.device.value})")
    stalls = gui_stalls(np.asarray(ticks), t0, steps[0], steps[-1], time.perf_counter())
    print(f"GUI stall, largest gap of a {TICK_MS} ms QTimer on the GUI thread: " + "; ".join(
        f"{gap:.0f} ms {what} ({seconds_in:.0f} s)" for what, (gap, seconds_in) in stalls.items()))
    print(f"status: {widget.status.value}")
    print(f"torch loaded in the viewer's process: {'torch' in sys.modules}")
    print(f"gui_gap_segmenting_ms={stalls['while segmenting'][0]:.0f} "
          f"mpx_per_s={result.segmented_px / 1e6 / seconds:.3f} peak_rss_gb={rss.peak / 2**30:.2f}")
    viewer.close()


def gui_stalls(ticks: np.ndarray, start: float, first_step: float, last_step: float, end: float) -> dict:
    """The largest gap between timer ticks (ms) and the seconds of each part of a run: loading the
    model and finding tissue (before the first step), segmenting (the steps), adding the layers."""
    parts = {"loading the model": (start, first_step), "while segmenting": (first_step, last_step),
             "adding the result layers": (last_step, end)}
    stalls = {}
    for what, (t0, t1) in parts.items():
        inside = np.concatenate([[t0], ticks[(ticks > t0) & (ticks < t1)], [t1]])
        stalls[what] = (np.diff(inside).max() * 1000, t1 - t0)
    return stalls


def _print_result(result, seconds: float, rss, start_rss: int, how: str) -> None:
    tissue_mpx = result.segmented_px / 1e6
    print(f"segmented {how}: region {result.region}, {tissue_mpx:.0f} Mpx of tissue blocks; "
          f"tissue mask {result.tissue_fraction:.1%} of the slide")
    phases = ", ".join(f"{name} {value:.1f} s" for name, value in result.seconds.items())
    print(f"total {seconds:.1f} s ({phases}): {tissue_mpx / seconds:.2f} Mpx/s of tissue end to end, "
          f"{tissue_mpx / result.seconds['model']:.2f} Mpx/s in the model phase")
    parts = (f": this process {rss.own_peak / 2**30:.2f} GiB, the slide-run process {rss.children_peak / 2**30:.2f} GiB"
             if rss.children_peak else "")
    print(f"peak RSS {rss.peak / 2**30:.2f} GiB{parts} (start {start_rss / 2**30:.2f} GiB); "
          f"nuclei {result.nuclei}: {result.counts}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=16384)
    parser.add_argument("--height", type=int, default=12288)
    parser.add_argument("--tissue", type=float, default=0.25)
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="who runs the network, as medseg predict --backend (default auto)")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--workdir", default=None, help="where the slide and results go (a temp folder if unset)")
    parser.add_argument("--viewer", action="store_true", help="segment from napari's Segment widget; GUI stall")
    parser.add_argument("--region", metavar="X,Y,W,H", help="with --viewer: a rectangle drawn over this region")
    args = parser.parse_args()

    from napari_medseg.io.slide_outputs import fresh_results_folder
    from napari_medseg.memory import limit_allocator_arenas

    if not args.viewer:  # this process runs the slide, as medseg predict's does (the viewer's is left alone)
        limit_allocator_arenas()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_wsi_"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    share = write_slide(work / "slide.tif", args.height, args.width, args.tissue)
    print(f"slide: {args.width} x {args.height} px ({args.width * args.height / 1e6:.0f} Mpx), tissue {share:.1%} "
          f"of the cells, written in {time.perf_counter() - started:.0f} s ({(work / 'slide.tif').stat().st_size / 1e6:.0f} MB)")
    out = fresh_results_folder(work, "out")  # never into an earlier run's results
    if args.viewer:  # the viewer's process without torch, as a user's: the run's child process reads the threads
        if args.threads:
            os.environ["OMP_NUM_THREADS"] = str(args.threads)
        return segment_in_viewer(work / "slide.tif", out, args)
    import torch

    from napari_medseg.inference import Segmenter
    from napari_medseg.inference.settings import TileSettings
    from napari_medseg.inference.slide import predict_slide
    from napari_medseg.io.slides import open_slide

    if args.threads:
        torch.set_num_threads(args.threads)
    segmenter = Segmenter.load(args.model, device=args.device, backend=args.backend)
    slide = open_slide(work / "slide.tif")
    settings = TileSettings(tile_size=args.tile)
    with PeakRSS() as rss:
        start_rss, t0 = rss_bytes(), time.perf_counter()
        result = predict_slide(segmenter, slide, out, settings=settings)
        seconds = time.perf_counter() - t0
    tissue_mpx = result.segmented_px / 1e6
    _print_result(result, seconds, rss, start_rss, "by predict_slide")
    print(f"device {segmenter.device}, run by {segmenter.backend.name} ({segmenter.backend.precision}), "
          f"torch threads {torch.get_num_threads()}, results in {out}")
    print(f"mpx_per_s={tissue_mpx / seconds:.3f} peak_rss_gb={rss.peak / 2**30:.2f} nuclei={result.nuclei}")


if __name__ == "__main__":
    main()
