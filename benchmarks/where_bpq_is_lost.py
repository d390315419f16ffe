"""Where a model's nucleus bPQ is lost: its foreground (the class map) or its distance map (the
seeds that split touching nuclei)? Each is swapped for the one made from the annotation, in turn:

    python benchmarks/where_bpq_is_lost.py --threads 2                 # the shipped default
    python benchmarks/where_bpq_is_lost.py --model runs/x/best.safetensors --groups-per-set 6

Per set, bPQ (detection F1 / segmentation quality SQ, pooled) of the nuclei the product's watershed cuts (the model's own ``InstanceSettings``) from

* the model's foreground and distance map (what the product does);
* the annotated foreground with the model's distance map (a perfect class map);
* the model's foreground with the annotation's distance map (``nucleus_distance_map`` of the
  instances: perfect seeds, 1 at each centre, 0 where nuclei touch);
* both from the annotation (what the watershed itself loses: size floors, seed rules).

Images: ``--groups-per-set`` *training* source images of each set the split model trained on (as
``tune_instances.py``), so the held-out ones are not looked at. Last line, machine-readable.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDSEG_DATA", REPO.parent / "shared" / "data"))
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from napari_medseg.evaluation.instance import aggregate_instance_stats, image_instance_stats  # noqa: E402
from napari_medseg.evaluation.instance_tuning import model_outputs  # noqa: E402
from napari_medseg.evaluation.threshold import samples_of_groups  # noqa: E402
from napari_medseg.nuclei.distance import nucleus_distance_map  # noqa: E402
from napari_medseg.nuclei.watershed import semantic_to_instances  # noqa: E402
from tune_instances import DEFAULT_SETS, _split  # noqa: E402

CASES = {  # name: (foreground from the annotation?, distance map from the annotation?)
    "model": (False, False),
    "annotated foreground": (True, False),
    "annotated distance map": (False, True),
    "both annotated": (True, True),
}


def case_scores(outputs, from_annotation_fg: bool, from_annotation_distance: bool, settings) -> tuple[float, float, float]:
    """(bPQ, pooled detection F1, pooled SQ) of one case: PQ = F1 x SQ, so the two say whether
    nuclei are missed / merged / split (F1) or found with loose outlines (SQ)."""
    stats = []
    for o in outputs:
        foreground = (o.labels > 0) if from_annotation_fg else (o.class_map > 0)
        distance = nucleus_distance_map(o.instances) if from_annotation_distance else o.distance
        found = semantic_to_instances(foreground.astype(np.uint8), settings, distance)
        stats.append(image_instance_stats(o.instances, (o.labels > 0).astype(np.uint8), found,
                                          foreground.astype(np.uint8), 2))
    summary = aggregate_instance_stats(stats, ["background", "nucleus"])
    tp, fp, fn = (summary["binary"][k] for k in ("tp", "fp", "fn"))
    return summary["bpq"], 2 * tp / max(1, 2 * tp + fp + fn), summary["binary"]["sq"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="'default' or a .safetensors checkpoint")
    parser.add_argument("--split-from-model", default=None, help="whose validation groups are held out (default: --model)")
    parser.add_argument("--sets", default=",".join(str(DATA / n) for n in DEFAULT_SETS), help="dataset folders")
    parser.add_argument("--groups-per-set", type=int, default=4, help="training source images per set")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    import torch

    from napari_medseg.inference import Segmenter

    torch.set_num_threads(args.threads)
    segmenter = Segmenter.load(args.model, device="cpu", backend="torch")
    if not segmenter.has_distance_head:
        sys.exit(f"{args.model} has no distance head: nothing to swap")
    split_meta = Segmenter.load(args.split_from_model, device="cpu").meta if args.split_from_model else segmenter.meta
    val_groups = split_meta.data.get("val_groups") or []
    settings = segmenter.instance_settings
    print(f"nuclei cut with {settings}")
    print("| set | images | " + " | ".join(CASES) + " |")
    print("|---|---|" + "---|" * len(CASES))
    summary = []
    for folder in [Path(f.strip()) for f in args.sets.split(",") if f.strip()]:
        training, _ = _split(folder, val_groups, args.groups_per_set)
        outputs = model_outputs(segmenter, samples_of_groups(folder, training)[1])
        scores = {name: case_scores(outputs, *how, settings) for name, how in CASES.items()}
        print(f"| {folder.name} | {len(outputs)} | "
              + " | ".join(f"{b:.3f} ({f1:.3f} / {sq:.3f})" for b, f1, sq in scores.values()) + " |")
        summary += [f"{folder.name}_{name.replace(' ', '_')}={v[0]:.4f}" for name, v in scores.items()]
    print(" ".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
