"""Accuracy of a model and of the classical baseline on the held-out validation split.

The validation split is the source images a model was validated on (its metadata's
``data.val_groups``, e.g. CoNSeP train_12/19/22/25 for the shipped default): every 256²
patch of those images, never seen in training. The scoring is
``napari_medseg.evaluation.benchmark``: the model runs tiled (``Segmenter``); its instances
come from its class map by a marker watershed (``napari_medseg.nuclei.watershed``), seeded by
the model's own distance map where it has a distance head, by the class map's distance
transform otherwise; the classical baseline (``napari_medseg.nuclei.classical.classical_nuclei``:
haematoxylin deconvolution, Otsu, watershed) runs on the same patches. Both are scored against
the dataset's class maps and instance maps with ``napari_medseg.evaluation.report.PairEvaluation``.

    python benchmarks/accuracy.py                          # default model, CoNSeP validation split
    python benchmarks/accuracy.py --model runs/x/best.safetensors --json acc.json
    python benchmarks/accuracy.py --data ../shared/data/monuseg_train --all-images   # external: MoNuSeg
    python benchmarks/accuracy.py --per-set --model default --model runs/all_data/mixed/best.safetensors

``--per-set`` scores every ``--model`` and the baseline on each validation set
(``--sets``: CoNSeP, MoNuSeg and TNBC by default) using the source images the split model
(``--split-from-model``, by default the last ``--model``) held out of each, says which sets
each model saw in training (other images of them), and checks the rule for shipping a new
default: the last model above the first (the current default) and the baseline in Dice and bPQ
on every set.

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
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDSEG_DATA", REPO.parent / "shared" / "data"))
sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from napari_medseg.evaluation.benchmark import score_model_and_baseline, scores_nuclei_only  # noqa: E402
from napari_medseg.evaluation.threshold import samples_of_groups  # noqa: E402
from napari_medseg.inference.settings import BACKENDS, PRECISIONS  # noqa: E402
from napari_medseg.nuclei.watershed import InstanceSettings  # noqa: E402

# Targets from the issue (CoNSeP-style data; HoVer-Net reports Dice 0.8525 / bPQ 0.5477 on CoNSeP).
TARGETS = {"nucleus_dice": 0.85, "bpq": 0.55, "margin": 0.15}
DEFAULT_SETS = ("consep_train", "monuseg_train", "tnbc_train")


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", help="'default' or a .safetensors checkpoint (default: 'default'; "
                                                        "with --per-set, repeat it to compare models)")
    parser.add_argument("--data", default=str(DATA / "consep_train"), help="dataset folder with labels/ and instances/")
    parser.add_argument("--split-from-model", default=None,
                        help="take the validation groups from this checkpoint's metadata (default: from --model)")
    parser.add_argument("--all-images", action="store_true", help="evaluate every image of --data, not the validation split")
    parser.add_argument("--groups", help="evaluate these source images instead (comma-separated, e.g. train_1,train_2: "
                                         "training images, to tune post-processing without touching the held-out ones)")
    own = "default: each model's own (medseg tune-nuclei), else"
    parser.add_argument("--min-distance", type=int,
                        help=f"watershed seed distance for the model's instances (px; {own} "
                             f"{InstanceSettings.min_distance})")
    parser.add_argument("--min-size", type=int,
                        help=f"drop smaller model objects (px; {own} {InstanceSettings.min_size})")
    parser.add_argument("--marker-threshold", type=float,
                        help=f"models with a distance head: watershed seeds where the distance map exceeds this "
                             f"({own} {InstanceSettings.marker_threshold})")
    parser.add_argument("--min-marker-size", type=int,
                        help=f"models with a distance head: drop smaller seeds (px; {own} "
                             f"{InstanceSettings.min_marker_size})")
    parser.add_argument("--tta", action="store_true",
                        help="also score the model with test-time augmentation (mean over 4 flips; 4x the time)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="torch", choices=BACKENDS,
                        help="who runs the network (default torch: the float32 reference); e.g. --backend auto "
                             "scores what medseg predict runs, int8 included where auto picks it")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="the runtime's precision, as medseg predict --precision")
    parser.add_argument("--json", help="write all numbers here")
    parser.add_argument("--per-set", action="store_true",
                        help="score every --model and the baseline on each of --sets' held-out images")
    parser.add_argument("--sets", default=",".join(str(DATA / n) for n in DEFAULT_SETS),
                        help="comma-separated dataset folders for --per-set")
    return parser


def _model_label(model: str, meta) -> str:
    name = "default" if model == "default" else Path(model).name
    m = meta.model
    return f"{name} ({m.architecture})" if m.architecture in ("vanilla_unet", "attention_res_unet") else \
        f"{name} ({m.architecture}/{m.encoder})"


def _print_targets(scores: dict) -> None:
    model, baseline = scores["model"][0], scores["baseline"][0]
    for suffix, scored in [("", model)] + ([(" with flips", scores["model_tta"][0])] if "model_tta" in scores else []):
        for name, value, target in ((f"nucleus Dice{suffix}", scored["nucleus_dice"], TARGETS["nucleus_dice"]),
                                    (f"bPQ{suffix}", scored["bpq"], TARGETS["bpq"]),
                                    (f"Dice margin over the baseline{suffix}", scored["nucleus_dice"] - baseline["nucleus_dice"],
                                     TARGETS["margin"])):
            print(f"target {name} >= {target:.2f}: {value:.4f}  {'met' if value >= target else 'NOT met'}")


def _print_results(scores: dict, classes: list[str], label: str, images: int, normalization: dict) -> None:
    rows = {"model": f"{label}, as loaded by Segmenter",
            "model_input_as_trained": f"{label}, input as trained ([0, 1], no mean/std)",
            "model_tta": f"{label}, with test-time flips (--tta)",
            "baseline": "classical baseline (H + Otsu + watershed)"}
    print()
    for line in format_table({rows[key]: summary for key, (summary, _) in scores.items()}, classes):
        print(line)
    print()
    tta = f"with flips {scores['model_tta'][1]:.1f} s, " if "model_tta" in scores else ""
    print(f"time: model {scores['model'][1]:.1f} s, {tta}baseline {scores['baseline'][1]:.1f} s for {images} images")
    if "model_input_as_trained" in scores:
        print(f"WARNING: this checkpoint's metadata names input normalisation {normalization}, but its training config "
              "records none: the trainer fed it [0, 1] pixels. Segmenter (predict, the napari widget) applies the "
              "metadata's normalisation, so the first row is what users get; the second row shows the same weights "
              "fed as they were trained. The targets below are checked on the first row.")
    _print_targets(scores)


def trained_sets(meta) -> set[str]:
    """Folder names of the datasets a checkpoint's training config names (other images of them were trained on)."""
    data = ((meta.training or {}).get("config") or {}).get("data") or {}
    paths = [d.get("path") for d in data.get("datasets") or []] + list(data.get("dataset") or [])
    return {Path(p).name for p in paths if p}


def trained_on_held_out(meta, groups: list[str]) -> list[str]:
    """Those of ``groups`` a checkpoint's run trained on, for a run on their set: the ones it did
    not hold out itself (a fine-tune split with another seed had trained on its start's held-out
    images). Nothing where it records no split (it cannot be told)."""
    own = meta.data.get("val_groups") if isinstance(meta.data, dict) else None
    if not isinstance(own, list) or not own:
        return []
    return [g for g in groups if g not in own]


def ship_rule(per_set: dict, candidate: str, against: list[str]) -> list[str]:
    """The sets on which ``candidate`` is not above each row of ``against`` (the current default,
    the baseline) in both Dice and bPQ."""
    failing = []
    for name, rows in per_set.items():
        mine = rows[candidate]
        if any(r["nucleus_dice"] >= mine["nucleus_dice"] or r["bpq"] >= mine["bpq"]
               for other, r in rows.items() if other in against):
            failing.append(name)
    return failing


def main_per_set(args, parser) -> int:
    """Every model and the baseline on each set's held-out source images; the shipping rule."""
    import torch

    from napari_medseg.evaluation.benchmark import evaluate_baseline, evaluate_segmenter
    from napari_medseg.inference import Segmenter, TileSettings

    torch.set_num_threads(args.threads)
    models = args.model or ["default"]
    segmenters = {m: Segmenter.load(m, device=args.device, backend=args.backend, precision=args.precision)
                  for m in models}
    for m, seg in segmenters.items():
        print(f"{m}: run by {seg.backend.name} ({seg.backend.precision})"
              + (f": {'; '.join(seg.backend.notes)}" if seg.backend.notes else ""))
    split_from = args.split_from_model or models[-1]
    split_meta = Segmenter.load(split_from, device="cpu").meta
    val_groups, split_sets = split_meta.data.get("val_groups") or [], trained_sets(split_meta)
    if not val_groups:
        parser.error(f"{split_from} names no validation groups")
    labels = {m: _model_label(m, s.meta) for m, s in segmenters.items()}
    if len(set(labels.values())) < len(labels):
        labels = {m: f"{m}" for m in models}
    tiles = TileSettings(tta=args.tta)
    per_set, seen, out = {}, {}, {"models": models, "labels": labels, "split_from": split_from, "tta": args.tta,
                                  "sets": {}}
    print(f"validation split from {split_from}; instances by each model's own watershed"
          f"{'; test-time flips' if args.tta else ''}")
    for folder in [f.strip() for f in args.sets.split(",") if f.strip()]:
        name = Path(folder).name
        # a mixed run names its groups '<set>/<group>'; a one-set run bare, for the set it trained on
        groups = [g for g in val_groups if g.startswith(f"{name}/")] or \
            [g for g in val_groups if "/" not in g and split_sets == {name}]
        if not groups:
            print(f"\n{name}: the split names none of its images; skipped")
            continue
        classes, samples = samples_of_groups(folder, groups)
        rows, seconds = {}, {}
        for m, segmenter in segmenters.items():
            rows[labels[m]], seconds[labels[m]] = evaluate_segmenter(
                segmenter, classes, samples, segmenter.instance_settings_with(_instance_overrides(args)), tiles)
        rows["classical baseline"], seconds["classical baseline"] = evaluate_baseline(classes, samples)
        per_set[name] = rows
        seen[name] = [labels[m] for m, s in segmenters.items() if name in trained_sets(s.meta)]
        leaked = {labels[m]: trained_on_held_out(s.meta, groups) for m, s in segmenters.items()
                  if name in trained_sets(s.meta)}
        leaked = {label: names for label, names in leaked.items() if names}
        print(f"\n{name}: {len(samples)} images of {len(groups)} held-out source images ({', '.join(groups)})")
        print("seen in training (other images of this set): " + (", ".join(seen[name]) or "none of the models"))
        for label, names in leaked.items():
            print(f"WARNING: {label} trained on {len(names)} of these source images ({', '.join(names)}): "
                  "its figures here are not held out")
        for line in format_table(rows, classes if len(classes) > 2 else classes[:1]):
            print(line)
        out["sets"][name] = {"groups": groups, "images": len(samples), "seen_by": seen[name], "results": rows,
                             "seconds": seconds, "trained_on_held_out": leaked}
    if not per_set:
        parser.error("no set has held-out images in the split")
    names = list(next(iter(per_set.values())))
    print("\n| set | " + " | ".join(f"{n} Dice / bPQ" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for name, rows in per_set.items():
        print(f"| {name} | " + " | ".join(f"{r['nucleus_dice']:.3f} / {r['bpq']:.3f}" for r in rows.values()) + " |")
    candidate, against = labels[models[-1]], [labels[models[0]], "classical baseline"]
    failing = ship_rule(per_set, candidate, against if len(models) > 1 else against[1:])
    verdict = "met" if not failing else "NOT met (" + ", ".join(failing) + ")"
    print(f"\nship rule ({candidate} above {' and '.join(against if len(models) > 1 else against[1:])} "
          f"in Dice and bPQ on every set): {verdict}")
    out["ship_rule_failing"] = failing
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    print(" ".join(f"{name}_dice={rows[candidate]['nucleus_dice']:.4f} {name}_bpq={rows[candidate]['bpq']:.4f}"
                   for name, rows in per_set.items()) + f" ship_rule={'met' if not failing else 'not_met'}")
    return 0


def _instance_overrides(args) -> dict:
    """The watershed settings given on the command line (the others are each model's own)."""
    given = {"min_distance": args.min_distance, "min_size": args.min_size, "marker_threshold": args.marker_threshold,
             "min_marker_size": args.min_marker_size}
    return {k: v for k, v in given.items() if v is not None}


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.per_set:
        return main_per_set(args, parser)
    if args.model and len(args.model) > 1:
        parser.error("several --model need --per-set")
    args.model = (args.model or ["default"])[0]

    import torch

    from napari_medseg.inference import Segmenter

    torch.set_num_threads(args.threads)
    segmenter = Segmenter.load(args.model, device=args.device, backend=args.backend, precision=args.precision)
    print(f"run by {segmenter.backend.name} ({segmenter.backend.precision})"
          + (f": {'; '.join(segmenter.backend.notes)}" if segmenter.backend.notes else ""))
    split_meta = Segmenter.load(args.split_from_model, device="cpu").meta if args.split_from_model else segmenter.meta
    val_groups = None if args.all_images else split_meta.data.get("val_groups")
    if args.groups:
        val_groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    if not args.all_images and not val_groups:
        parser.error("the model's metadata names no validation groups; pass --split-from-model or --all-images")
    classes, samples = samples_of_groups(args.data, val_groups)
    print(f"data: {args.data}  validation groups: {', '.join(val_groups) if val_groups else 'all'}  ({len(samples)} images)")
    seeds = "distance head" if segmenter.has_distance_head else "class map's distance transform"
    print(f"model instances: watershed seeded by the {seeds}")
    if scores_nuclei_only(segmenter.classes, classes):
        print(f"data classes {classes}: the model's {len(segmenter.classes) - 1} classes are scored as one "
              f"'{classes[1]}' class (binary numbers only)")
    instance_settings = segmenter.instance_settings_with(_instance_overrides(args))
    print(f"model instances: {instance_settings}")
    scores = score_model_and_baseline(segmenter, classes, samples, instance_settings, tta=args.tta)
    _print_results(scores, classes, _model_label(args.model, segmenter.meta), len(samples),
                   segmenter.meta.normalization)
    model, baseline = scores["model"][0], scores["baseline"][0]
    margin = model["nucleus_dice"] - baseline["nucleus_dice"]
    if args.json:
        order = [key for key in ("model", "baseline", "model_input_as_trained", "model_tta") if key in scores]
        out = {"model": args.model, "data": args.data, "val_groups": val_groups, "images": len(samples),
               "results": {key: scores[key][0] for key in order}, "margin": margin, "targets": TARGETS,
               "seconds": {key: scores[key][1] for key in order if key != "model_input_as_trained"}}
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    print(f"model_dice={model['nucleus_dice']:.4f} model_bpq={model['bpq']:.4f} model_mpq={model['mpq']:.4f} "
          f"model_aji={model['aji']:.4f} baseline_dice={baseline['nucleus_dice']:.4f} baseline_bpq={baseline['bpq']:.4f} "
          f"margin={margin:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
