"""What lies between the annotated nuclei that a model merges into one: are they a chain of
touching nuclei (each within 1 px of the next: only the distance map's seeds can part them), or
does annotated background separate some of them (the foreground bridged a gap: a loss weighted
on the background between nuclei, as the U-Net paper's border weights, could part them)?

    python benchmarks/merged_nuclei_gaps.py --threads 2                    # the shipped default, CoNSeP
    python benchmarks/merged_nuclei_gaps.py --model runs/x/best.safetensors --sets ../shared/data/monuseg_train

A predicted nucleus *merges* the annotated nuclei of which it covers more than half (two or more;
``napari_medseg.evaluation.error_kinds.merges_by_contact``).
Images: ``--groups-per-set`` *training* source images of each set (as ``tune_instances.py``), every
``--every``-th of their images, so the held-out ones are not looked at. Last line, machine-readable.
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

from napari_medseg.evaluation.error_kinds import merges_by_contact  # noqa: E402
from napari_medseg.evaluation.threshold import samples_of_groups  # noqa: E402
from tune_instances import _split  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="'default' or a .safetensors checkpoint")
    parser.add_argument("--split-from-model", default=None, help="whose validation groups are held out (default: --model)")
    parser.add_argument("--sets", default=str(DATA / "consep_train"), help="dataset folders, comma-separated")
    parser.add_argument("--groups-per-set", type=int, default=12, help="training source images per set")
    parser.add_argument("--every", type=int, default=4, help="every n-th image of them")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    import torch

    from napari_medseg.inference import Segmenter

    torch.set_num_threads(args.threads)
    segmenter = Segmenter.load(args.model, device="cpu", backend="torch")
    split_meta = Segmenter.load(args.split_from_model, device="cpu").meta if args.split_from_model else segmenter.meta
    val_groups = split_meta.data.get("val_groups") or []
    print("| set | images | merging nuclei | of which their nuclei all touch | background between some |")
    print("|---|---|---|---|---|")
    machine = []
    for folder in [Path(f.strip()) for f in args.sets.split(",") if f.strip()]:
        training, _ = _split(folder, val_groups, args.groups_per_set)
        samples = samples_of_groups(folder, training)[1][::args.every]
        counts = {"touching": [0, 0], "separated": [0, 0]}  # [merging predictions, annotated nuclei]
        for s in samples:
            _, predicted = segmenter.segment_nuclei(s.image)
            for kind, (merges, nuclei) in merges_by_contact(s.instances, predicted).items():
                counts[kind][0] += merges
                counts[kind][1] += nuclei
        (chains, chained), (gapped, separated) = counts["touching"], counts["separated"]
        print(f"| {folder.name} | {len(samples)} | {chains + gapped} ({chained + separated} annotated) | "
              f"{chains} ({chained} annotated) | {gapped} ({separated} annotated) |")
        machine += [f"{folder.name}_touching={chains}", f"{folder.name}_separated={gapped}"]
    print(" ".join(machine))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
