"""What becomes of the annotated nuclei of each held-out set: found, missed, merged with a
neighbour, outlined badly; and of the predicted ones: matched, false alarms, splits, merges
(``napari_medseg.evaluation.error_kinds``). The nuclei are the product's (``Segmenter.segment_nuclei``,
each model's own post-processing), on the held-out images ``accuracy.py --per-set`` scores.

    python benchmarks/nucleus_errors.py --threads 2                      # the shipped default
    python benchmarks/nucleus_errors.py --model default --model runs/x/best.safetensors

Last line, machine-readable: ``<set>_<model index>_<kind>=<count>`` for the annotated nuclei.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDSEG_DATA", REPO.parent / "shared" / "data"))
sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from napari_medseg.evaluation.error_kinds import (PREDICTION_KINDS, TRUTH_KINDS, add_error_kinds,  # noqa: E402
                                                  nucleus_error_kinds)
from napari_medseg.evaluation.threshold import samples_of_groups  # noqa: E402

DEFAULT_SETS = ("consep_train", "monuseg_train", "tnbc_train")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", help="'default' or a .safetensors checkpoint (repeat to compare)")
    parser.add_argument("--split-from-model", default="default", help="whose validation groups are held out")
    parser.add_argument("--sets", default=",".join(str(DATA / n) for n in DEFAULT_SETS), help="dataset folders")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    import torch

    from napari_medseg.inference import Segmenter

    torch.set_num_threads(args.threads)
    models = args.model or ["default"]
    segmenters = [Segmenter.load(m, device="cpu", backend="torch") for m in models]
    val_groups = Segmenter.load(args.split_from_model, device="cpu").meta.data.get("val_groups") or []
    machine = []
    for folder in [f.strip() for f in args.sets.split(",") if f.strip()]:
        name = Path(folder).name
        groups = [g for g in val_groups if g.startswith(f"{name}/")]
        if not groups:
            print(f"\n{name}: the split names none of its images; skipped")
            continue
        _, samples = samples_of_groups(folder, groups)
        print(f"\n{name}: {len(samples)} held-out images ({', '.join(g.split('/', 1)[1] for g in groups)})")
        print("| model | annotated | " + " | ".join(TRUTH_KINDS) + " | predicted | "
              + " | ".join(PREDICTION_KINDS) + " |")
        print("|---|" + "---|" * (len(TRUTH_KINDS) + len(PREDICTION_KINDS) + 2))
        for index, (model, segmenter) in enumerate(zip(models, segmenters)):
            total = None
            for s in samples:
                _, predicted = segmenter.segment_nuclei(s.image)
                total = add_error_kinds(total, nucleus_error_kinds(s.instances, predicted))
            truth, pred = total["truth"], total["predicted"]
            print(f"| {model} | {sum(truth.values())} | " + " | ".join(str(truth[k]) for k in TRUTH_KINDS)
                  + f" | {sum(pred.values())} | " + " | ".join(str(pred[k]) for k in PREDICTION_KINDS) + " |")
            machine += [f"{name}_{index}_{k}={truth[k]}" for k in TRUTH_KINDS]
    print(" ".join(machine))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
