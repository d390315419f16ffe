"""Make a trained checkpoint the shipped default model, with its held-out accuracy in its metadata.

    medseg train configs/default.yaml     # four stages -> runs/default/<stage>
    medseg tune-threshold runs/default/stain_robust/best.safetensors ../shared/data/consep_train \
        --out runs/default/tuned.safetensors
    python benchmarks/accuracy.py --model runs/default/tuned.safetensors --tta --json runs/default/accuracy.json
    python benchmarks/accuracy.py --model runs/default/tuned.safetensors --tta \
        --data ../shared/data/monuseg_train --all-images --json runs/default/monuseg.json
    python scripts/package_default_model.py runs/default/tuned.safetensors runs/default/accuracy.json \
        --external runs/default/monuseg.json

The weights are stored as float16 (the package keeps the model under 20 MB); the metadata keeps
the trainer's config, data description and validation record, and gains ``metrics.held_out``:
the numbers ``benchmarks/accuracy.py`` measured for the model (with test-time flips too, if
it ran with ``--tta``) and the classical baseline, and ``metrics.external``: the same on
datasets it never saw (``--external``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from napari_medseg.models import DEFAULT_MODEL_PATH, load_checkpoint, save_checkpoint  # noqa: E402

MAX_BYTES = 20 * 1024 * 1024
HEADLINE = ("nucleus_dice", "bpq", "mpq", "f1", "aji", "miou")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="best.safetensors of the training run")
    parser.add_argument("accuracy", help="the --json written by benchmarks/accuracy.py for that checkpoint (one set, "
                                         "or --per-set with the checkpoint among its --model)")
    parser.add_argument("--external", action="append", default=[], metavar="JSON",
                        help="accuracy.py --json of the same checkpoint on other data (e.g. MoNuSeg, --all-images): "
                             "recorded under metrics.external.<dataset folder>")
    parser.add_argument("--out", default=str(DEFAULT_MODEL_PATH))
    args = parser.parse_args(argv)

    model, meta = load_checkpoint(args.checkpoint)
    acc = json.loads(Path(args.accuracy).read_text())
    try:
        meta.metrics["held_out"] = (per_set_record(acc, args.checkpoint) if "sets" in acc
                                    else single_set_record(acc, args.checkpoint, meta.model.distance_head))
    except ValueError as exc:
        parser.error(f"{args.accuracy}: {exc}")
    for path in args.external:
        ext = json.loads(Path(path).read_text())
        if not _measured(ext["model"], args.checkpoint):
            parser.error(f"{path} measured {ext['model']}, not {args.checkpoint}")
        # binary numbers only where the data has one foreground class (accuracy.py merges the model's classes)
        record = {"data": ext["data"], "images": ext["images"],
                  "what": "benchmarks/accuracy.py on every image of a dataset no training run or checkpoint choice used",
                  "model": {k: ext["results"]["model"][k] for k in ("nucleus_dice", "bpq", "f1", "aji")},
                  "classical_baseline": {k: ext["results"]["baseline"][k] for k in ("nucleus_dice", "bpq", "f1", "aji")}}
        if "model_tta" in ext["results"]:
            record["model_with_flips"] = {k: ext["results"]["model_tta"][k] for k in ("nucleus_dice", "bpq", "f1", "aji")}
        meta.metrics.setdefault("external", {})[Path(ext["data"]).name] = record
    out = save_checkpoint(args.out, model, meta, half=True)
    size = out.stat().st_size
    print(f"wrote {out} ({size / 2**20:.1f} MiB)")
    if size > MAX_BYTES:
        print(f"error: {out} is over the 20 MB the package allows", file=sys.stderr)
        return 1
    return 0


def _measured(path: str, checkpoint: str) -> bool:
    return Path(path).resolve() == Path(checkpoint).resolve()


def single_set_record(acc: dict, checkpoint: str, distance_head: bool) -> dict:
    """``metrics.held_out`` from ``accuracy.py --json`` on one set (the model's validation images)."""
    if not _measured(acc["model"], checkpoint):
        raise ValueError(f"it measured {acc['model']}, not {checkpoint}")
    results = acc["results"]
    record = {
        "what": "benchmarks/accuracy.py: every 256² patch of the validation source images, tiled inference, "
                + ("instances by the watershed of the class map seeded by the model's distance head"
                   if distance_head else "instances by distance-transform watershed of the class map"),
        "val_groups": acc["val_groups"], "images": acc["images"],
        "model": {k: results["model"][k] for k in HEADLINE} | {"per_class": results["model"]["per_class"]},
        "classical_baseline": {k: results["baseline"][k] for k in HEADLINE},
    }
    if "model_tta" in results:  # accuracy.py --tta
        record["model_with_flips"] = {k: results["model_tta"][k] for k in HEADLINE}
    return record


def per_set_record(acc: dict, checkpoint: str) -> dict:
    """``metrics.held_out`` from ``accuracy.py --per-set --json``: per set, the model's figures, the
    classical baseline's and those of the other models it was compared with (the default it
    replaces), on that set's held-out source images; and the shipping rule's verdict."""
    labels = acc.get("labels") or {}
    mine = next((label for model, label in labels.items() if _measured(model, checkpoint)), None)
    if mine is None:
        raise ValueError(f"it did not measure {checkpoint} (models: {', '.join(labels) or 'unnamed'})")
    sets = {}
    for name, record in acc["sets"].items():
        rows = record["results"]
        sets[name] = {"groups": record["groups"], "images": record["images"], "seen_in_training": mine in record["seen_by"],
                      "model": {k: v for k, v in rows[mine].items() if k in HEADLINE or k == "per_class"},
                      **{("classical_baseline" if label == "classical baseline" else f"compared: {label}"):
                         {k: v for k, v in row.items() if k in HEADLINE} for label, row in rows.items() if label != mine}}
    return {"what": "benchmarks/accuracy.py --per-set: every 256² patch (whole images for 1000² / 512² sets) of each "
                    "set's held-out source images, tiled inference (test-time flips: see 'tta')",
            "tta": acc["tta"], "sets": sets, "ship_rule_failing": acc.get("ship_rule_failing", [])}


if __name__ == "__main__":
    sys.exit(main())
