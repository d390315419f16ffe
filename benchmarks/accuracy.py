"""Accuracy of a model and of the classical baseline on the held-out validation split.

The validation split is the source images a model was validated on (its metadata's
``data.val_groups``, e.g. CoNSeP train_12/19/22/25 for the shipped default): every 256²
patch of those images, never seen in training. The model runs tiled (``Segmenter``); its
instances come from its class map by a marker watershed
(``napari_medseg.instances.semantic_to_instances``), seeded by the model's own distance map
where it has a distance head, by the class map's distance transform otherwise; the classical baseline
(``napari_medseg.nuclei.classical.classical_nuclei``: haematoxylin deconvolution, Otsu, watershed)
runs on the same patches. Both are scored against the dataset's class maps and instance
maps with ``napari_medseg.evaluation.PairEvaluation``.

    python benchmarks/accuracy.py                          # default model, CoNSeP validation split
    python benchmarks/accuracy.py --model runs/x/best.safetensors --json acc.json
    python benchmarks/accuracy.py --data ../shared/data/monuseg_train --all-images   # external: MoNuSeg

On data with a single foreground class (MoNuSeg's 'nucleus') the model's classes are merged
into it and only the binary numbers mean anything: a test on images from other organs and
hospitals that no training run or checkpoint choice has seen.

The baseline cannot classify nuclei: it is scored with its nuclei in an extra
"unclassified" class, so they count in the binary numbers (Dice, bPQ, F1, AJI) and score
zero in every per-class number. Numbers are per 256² patch (nuclei cut by patch borders
count as they are cut), so they are not directly comparable with whole-image figures
such as HoVer-Net's on the CoNSeP test set.

Last line, machine-readable: ``model_dice=... model_bpq=... baseline_dice=... margin=...``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDSEG_DATA", REPO.parent / "shared" / "data"))
sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from napari_medseg.nuclei.classical import ClassicalSettings, as_unclassified, classical_nuclei
from napari_medseg.evaluation.report import PairEvaluation
from napari_medseg.nuclei.watershed import InstanceSettings
from napari_medseg.io.dataset import DatasetError  # noqa: E402
from napari_medseg.evaluation.threshold import GROUP_PATTERN, samples_of_groups

# Targets from the issue (CoNSeP-style data; HoVer-Net reports Dice 0.8525 / bPQ 0.5477 on CoNSeP).
TARGETS = {"nucleus_dice": 0.85, "bpq": 0.55, "margin": 0.15}


def validation_samples(data: str | Path, val_groups: list[str] | None, group_pattern: str = GROUP_PATTERN):
    """The samples of ``data`` whose source image (``<folder name>/<group>``) is in ``val_groups``.

    ``val_groups=None`` takes every sample. Raises ``DatasetError`` if none match.
    """
    return samples_of_groups(data, val_groups, group_pattern)


def summarise(report: dict, classes: list[str]) -> dict:
    """The headline numbers of a ``PairEvaluation`` report; per-class numbers for ``classes[1:]`` only."""
    o = report["overall"]
    per_class = {c: {"f1": report["per_class"][c]["f1"], "iou": report["per_class"][c]["iou"],
                     "dice": report["per_class"][c]["dice"], "pq": report["per_class"][c]["pq"]}
                 for c in classes[1:]}
    ious = [v["iou"] for v in per_class.values() if not math.isnan(v["iou"])]
    return {
        "nucleus_dice": o["nucleus_dice"], "bpq": o["bpq"], "mpq": o["mpq"], "f1": o["f1"], "aji": o["aji"],
        "miou": float(np.mean(ious)) if ious else float("nan"),
        "per_class": per_class, "images": report["images"],
    }


def trained_normalization(meta) -> dict | None:
    """The input normalisation a checkpoint's weights were trained with, where it differs from its metadata's.

    Checkpoints written by the trainer before it recorded ``normalization`` in its config were
    trained on pixels scaled to [0, 1] only, while their metadata (and so ``Segmenter``) names
    ImageNet mean/std. For those this returns the identity (mean 0, std 1); ``None`` otherwise.
    """
    config = (meta.training or {}).get("config") or {}
    if not config or "normalization" in config:
        return None
    norm = meta.normalization or {}
    if list(norm.get("mean", [0.0])) in ([0.0], [0.0, 0.0, 0.0]) and list(norm.get("std", [1.0])) in ([1.0], [1.0, 1.0, 1.0]):
        return None
    return {"mean": [0.0], "std": [1.0]}


def scores_nuclei_only(model_classes: list[str], classes: list[str]) -> bool:
    """Whether a model is scored as nucleus vs background: the data has one foreground class
    (e.g. MoNuSeg's 'nucleus') and the model other classes. Raises if neither fits."""
    if model_classes == classes:
        return False
    if len(classes) == 2:
        return True
    raise DatasetError(f"The model's classes {model_classes} differ from the data's {classes}.")


def evaluate_segmenter(segmenter, classes: list[str], samples, instance_settings: InstanceSettings | None = None,
                       tile_settings=None) -> tuple[dict, float]:
    """(summary, seconds) of a ``Segmenter`` on ``samples``; instances as ``Segmenter.segment_nuclei`` makes them.

    On data with one foreground class every predicted class counts as that class."""
    merge = scores_nuclei_only(segmenter.classes, classes)
    instance_settings = instance_settings or InstanceSettings()
    evaluation = PairEvaluation(classes, instance_settings)
    t0 = time.perf_counter()
    for s in samples:
        pred, pred_instances = segmenter.segment_nuclei(s.image, tile_settings, instance_settings=instance_settings)
        if merge:
            pred = (pred > 0).astype(np.uint8)
        evaluation.add(s.stem, s.labels, pred, s.instances, pred_instances)
    return summarise(evaluation.report(), classes), time.perf_counter() - t0


def evaluate_baseline(classes: list[str], samples, settings: ClassicalSettings | None = None) -> tuple[dict, float]:
    """(summary, seconds) of the classical pipeline; its nuclei carry no class (see module docstring)."""
    names = list(classes) + (["unclassified"] if len(classes) > 2 else [])
    evaluation = PairEvaluation(names)
    t0 = time.perf_counter()
    for s in samples:
        class_map, instances = classical_nuclei(s.image, settings)
        evaluation.add(s.stem, s.labels, as_unclassified(class_map, len(classes)), s.instances, instances)
    return summarise(evaluation.report(), classes), time.perf_counter() - t0


def _f(v: float) -> str:
    return "  -   " if v is None or v != v else f"{v:.4f}"


def format_table(rows: dict[str, dict], classes: list[str]) -> list[str]:
    """A markdown table: one row per method."""
    head = ["method", "Dice", "bPQ", "mPQ", "F1", "AJI", "mIoU"]
    head += [f"F1 {c}" for c in classes[1:]] + [f"IoU {c}" for c in classes[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = [name] + [_f(r[k]) for k in ("nucleus_dice", "bpq", "mpq", "f1", "aji", "miou")]
        cells += [_f(r["per_class"][c]["f1"]) for c in classes[1:]] + [_f(r["per_class"][c]["iou"]) for c in classes[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="'default' or a .safetensors checkpoint")
    parser.add_argument("--data", default=str(DATA / "consep_train"), help="dataset folder with labels/ and instances/")
    parser.add_argument("--split-from-model", default=None,
                        help="take the validation groups from this checkpoint's metadata (default: from --model)")
    parser.add_argument("--all-images", action="store_true", help="evaluate every image of --data, not the validation split")
    parser.add_argument("--groups", help="evaluate these source images instead (comma-separated, e.g. train_1,train_2: "
                                         "training images, to tune post-processing without touching the held-out ones)")
    parser.add_argument("--min-distance", type=int, default=InstanceSettings.min_distance,
                        help="watershed seed distance for the model's instances (px)")
    parser.add_argument("--min-size", type=int, default=InstanceSettings.min_size, help="drop smaller model objects (px)")
    parser.add_argument("--marker-threshold", type=float, default=InstanceSettings.marker_threshold,
                        help="models with a distance head: watershed seeds where the distance map exceeds this")
    parser.add_argument("--tta", action="store_true",
                        help="also score the model with test-time augmentation (mean over 4 flips; 4x the time)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="write all numbers here")
    args = parser.parse_args(argv)

    import torch

    from napari_medseg.inference import Segmenter

    torch.set_num_threads(args.threads)
    segmenter = Segmenter.load(args.model, device=args.device)
    split_meta = Segmenter.load(args.split_from_model, device="cpu").meta if args.split_from_model else segmenter.meta
    val_groups = None if args.all_images else split_meta.data.get("val_groups")
    if args.groups:
        val_groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    if not args.all_images and not val_groups:
        parser.error("the model's metadata names no validation groups; pass --split-from-model or --all-images")
    classes, samples = validation_samples(args.data, val_groups)
    print(f"data: {args.data}  validation groups: {', '.join(val_groups) if val_groups else 'all'}  ({len(samples)} images)")

    model_name = "default" if args.model == "default" else Path(args.model).name
    m = segmenter.meta.model
    model_label = f"{model_name} ({m.architecture}/{m.encoder})" if m.architecture not in ("vanilla_unet", "attention_res_unet") else f"{model_name} ({m.architecture})"
    instance_settings = InstanceSettings(min_distance=args.min_distance, min_size=args.min_size,
                                         marker_threshold=args.marker_threshold)
    seeds = "distance head" if segmenter.has_distance_head else "class map's distance transform"
    print(f"model instances: watershed seeded by the {seeds}")
    if scores_nuclei_only(segmenter.classes, classes):
        print(f"data classes {classes}: the model's {len(segmenter.classes) - 1} classes are scored as one "
              f"'{classes[1]}' class (binary numbers only)")
    model, model_s = evaluate_segmenter(segmenter, classes, samples, instance_settings)
    rows = {f"{model_label}, as loaded by Segmenter": model}
    fixed = trained_normalization(segmenter.meta)
    if fixed is not None:
        shipped_norm = dict(segmenter.meta.normalization)
        segmenter.meta.normalization = fixed
        as_trained, _ = evaluate_segmenter(segmenter, classes, samples, instance_settings)
        segmenter.meta.normalization = shipped_norm
        rows[f"{model_label}, input as trained ([0, 1], no mean/std)"] = as_trained
    if args.tta:
        from napari_medseg.inference.settings import TileSettings

        with_tta, tta_s = evaluate_segmenter(segmenter, classes, samples, instance_settings, TileSettings(tta=True))
        rows[f"{model_label}, with test-time flips (--tta)"] = with_tta
    baseline, baseline_s = evaluate_baseline(classes, samples)
    rows["classical baseline (H + Otsu + watershed)"] = baseline
    margin = model["nucleus_dice"] - baseline["nucleus_dice"]

    print()
    for line in format_table(rows, classes):
        print(line)
    print()
    print(f"time: model {model_s:.1f} s, {f'with flips {tta_s:.1f} s, ' if args.tta else ''}"
          f"baseline {baseline_s:.1f} s for {len(samples)} images")
    if fixed is not None:
        print(f"WARNING: this checkpoint's metadata names input normalisation {shipped_norm}, but its training config "
              "records none: the trainer fed it [0, 1] pixels. Segmenter (predict, the napari widget) applies the "
              "metadata's normalisation, so the first row is what users get; the second row shows the same weights "
              "fed as they were trained. The targets below are checked on the first row.")
    for suffix, scored in [("", model)] + ([(" with flips", with_tta)] if args.tta else []):
        for name, value, target in ((f"nucleus Dice{suffix}", scored["nucleus_dice"], TARGETS["nucleus_dice"]),
                                    (f"bPQ{suffix}", scored["bpq"], TARGETS["bpq"]),
                                    (f"Dice margin over the baseline{suffix}", scored["nucleus_dice"] - baseline["nucleus_dice"],
                                     TARGETS["margin"])):
            print(f"target {name} >= {target:.2f}: {value:.4f}  {'met' if value >= target else 'NOT met'}")
    if args.json:
        out = {"model": args.model, "data": args.data, "val_groups": val_groups, "images": len(samples),
               "results": {"model": model, "baseline": baseline, **({"model_input_as_trained": as_trained} if fixed else {}),
                           **({"model_tta": with_tta} if args.tta else {})},
               "margin": margin, "targets": TARGETS,
               "seconds": {"model": model_s, "baseline": baseline_s, **({"model_tta": tta_s} if args.tta else {})}}
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    print(f"model_dice={model['nucleus_dice']:.4f} model_bpq={model['bpq']:.4f} model_mpq={model['mpq']:.4f} "
          f"model_aji={model['aji']:.4f} baseline_dice={baseline['nucleus_dice']:.4f} baseline_bpq={baseline['bpq']:.4f} "
          f"margin={margin:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
