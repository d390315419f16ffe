"""Nuclei of a 20x slide measured in µm², three ways, with the shipped 40x model (0.25 µm/px):
the engine resampling the crop itself (the slide's pixel size used), the crop resampled to
0.25 µm/px beforehand, and the crop taken as it is (its pixel size ignored). The first two
should agree; the third shows what ignoring the pixel size costs.

    python benchmarks/pixel_size_check.py [--slide PATH] [--region X,Y,W,H]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from napari_medseg.inference import Segmenter
from napari_medseg.inference.regions import Region
from napari_medseg.inference.rescale import resample
from napari_medseg.io.slides import open_slide
from napari_medseg.nuclei.measure import object_table

SLIDE = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"


def measured(model: Segmenter, image: np.ndarray, run_pixel_size, area_pixel_size: float) -> dict:
    started = time.perf_counter()
    labels, instances = model.segment_nuclei(image, pixel_size_um=run_pixel_size)
    table = object_table(instances, labels, model.classes, pixel_size_um=area_pixel_size)
    areas = np.asarray(table["area_um2"])
    return {"nuclei": len(areas), "median_um2": float(np.median(areas)), "total_um2": float(areas.sum()),
            "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", default=str(SLIDE))
    parser.add_argument("--region", default="600,600,768,768", help="x,y,w,h in level-0 px")
    args = parser.parse_args()
    slide = open_slide(args.slide)
    region = Region.parse(args.region).checked(slide.shape)
    crop = np.asarray(slide.levels[0][region.slices])[..., :3]
    model = Segmenter.load("default", device="cpu", backend="torch")
    size, target = slide.pixel_size_um, model.meta.pixel_size_um
    side = (round(crop.shape[0] * size / target), round(crop.shape[1] * size / target))
    upsampled = (resample(crop / np.float32(255), side, channels_last=True).clip(0, 1) * 255).round().astype(np.uint8)
    rows = {
        f"engine resamples ({size:g} µm/px given)": measured(model, crop, size, size),
        f"resampled beforehand to {target:g} µm/px": measured(model, upsampled, target, size * crop.shape[0] / side[0]),
        "pixel size ignored": measured(model, crop, None, size),
    }
    print(f"{Path(args.slide).name} region {region} ({size:g} µm/px), model at {target:g} µm/px")
    print(f"{'':42s} {'nuclei':>7s} {'median µm²':>11s} {'total µm²':>10s} {'s':>6s}")
    for name, r in rows.items():
        print(f"{name:42s} {r['nuclei']:7d} {r['median_um2']:11.1f} {r['total_um2']:10.0f} {r['seconds']:6.1f}")


if __name__ == "__main__":
    main()
