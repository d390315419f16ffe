"""Peak memory of opening a huge flat (non-pyramidal) TIFF in napari and of segmenting it with
``medseg predict --no-instances``, for a single-strip (uncompressed, as ``tifffile.imwrite``
writes by default) and a tiled, compressed copy of the same plane.

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python benchmarks/bench_memory.py [--size 20000]

The plane is mostly glass (white) with a block of real H&E in the middle, so ``predict`` reads
and writes every row of the image but runs the network only on the tissue tiles. Each case runs
in a fresh process that reports its own peak RSS (``ru_maxrss``); each case's floor is the same
process on a 512² PNG (napari's window and OpenGL, torch and the model), and the figures are
what the big plane adds to it. The files go under a temporary folder in /tmp and are deleted
afterwards.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PATCH = ROOT / "src" / "napari_medseg" / "sample_data" / "consep_train_19_005.png"
FILES = {"single-strip": "single_strip.tif", "tiled": "tiled.tif"}

PEAK = "import resource; print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)"
NAPARI = textwrap.dedent("""
    import sys, napari
    from qtpy.QtWidgets import QApplication
    viewer = napari.Viewer()
    viewer.window._qt_window.resize(1600, 1000)
    (layer,) = viewer.open(sys.argv[1], plugin="napari-medseg")
    QApplication.processEvents()
    viewer.screenshot(canvas_only=True)  # the canvas has drawn the image
    print("layer", layer.name, "multiscale", layer.multiscale, flush=True)
""") + PEAK
PREDICT = textwrap.dedent("""
    import sys
    from napari_medseg.cli import main
    code = main(["predict", sys.argv[1], "--out", sys.argv[2], "--no-instances", "--device", "cpu"])
    assert code in (0, None), code
""") + PEAK


def make_plane(size: int) -> np.ndarray:
    """``size``² RGB glass with a 2048² block of real H&E (a CoNSeP patch, tiled) in the middle."""
    from napari_medseg.io import read_image

    plane = np.full((size, size, 3), 235, np.uint8)
    block = np.tile(read_image(PATCH)[:, :, :3], (8, 8, 1))
    top = (size - block.shape[0]) // 2
    plane[top:top + block.shape[0], top:top + block.shape[1]] = block
    return plane


def write_files(folder: Path, size: int) -> None:
    import tifffile
    from PIL import Image

    plane = make_plane(size)
    Image.fromarray(plane[size // 2 - 256:size // 2 + 256, size // 2 - 256:size // 2 + 256]).save(folder / "floor.png")
    tifffile.imwrite(folder / FILES["single-strip"], plane, photometric="rgb", bigtiff=True)  # one strip, raw
    tifffile.imwrite(folder / FILES["tiled"], plane, photometric="rgb", bigtiff=True, tile=(512, 512),
                     compression="zlib")


def peak_gb(code: str, *args: str) -> float:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("PEAK_KB")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"case failed ({done.returncode}):\n{done.stdout}\n{done.stderr[-3000:]}")
    return int(lines[-1].split()[1]) / 1024 ** 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=20000, help="side of the square RGB plane (px)")
    parser.add_argument("--cases", default="napari,predict", help="comma-separated: napari, predict")
    parser.add_argument("--write-into", help=argparse.SUPPRESS)  # the files are made in a child process
    args = parser.parse_args()
    if args.write_into:
        write_files(Path(args.write_into), args.size)
        return
    plane_gb = args.size ** 2 * 3 / 1024 ** 3
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="bench_memory_") as tmp:
        # in a child: on Linux a child's peak RSS starts from its parent's RSS when it forks
        subprocess.run([sys.executable, __file__, "--size", str(args.size), "--write-into", tmp], check=True)
        print(f"plane {args.size}x{args.size}x3 uint8 = {plane_gb:.2f} GiB")
        for case in args.cases.split(","):
            code = NAPARI if case == "napari" else PREDICT
            floor = peak_gb(code, str(Path(tmp) / "floor.png"), str(Path(tmp) / "out_floor"))
            print(f"{case:8s} floor (512² PNG) peak {floor:5.2f} GiB", flush=True)
            for kind, name in FILES.items():
                peak = peak_gb(code, str(Path(tmp) / name), str(Path(tmp) / f"out_{kind}"))
                print(f"{case:8s} {kind:13s} peak {peak:5.2f} GiB = floor + {peak - floor:5.2f} GiB "
                      f"({(peak - floor) / plane_gb:.2f}x the plane)", flush=True)


if __name__ == "__main__":
    main()
