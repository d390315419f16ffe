"""``medseg evaluate``: predicted label maps against ground truth, as a table."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import MedsegError
from ..wording import counted
from .settings import instance_settings_from
from .terminal import ProgressLine


def _fmt(value: float) -> str:
    return "   -  " if value != value else f"{value:6.4f}"  # NaN -> '-'


def cmd_evaluate(args) -> int:
    from ..evaluation.report import evaluate_folders, report_json
    from ..io.images import atomic_write
    from ..io.outputs import check_file_target

    pred, truth = Path(args.pred_dir), Path(args.gt_dir)
    if (pred / "images").is_dir() and not (truth / "images").is_dir() and (truth / "labels").is_dir():
        raise MedsegError(f"{truth} has no images/ but {pred} has: the two look swapped. The predictions come "
                          "first: medseg evaluate PREDICTIONS DATASET.")
    if args.json:  # before the work: it had written over the ground truth it read
        check_file_target(args.json, [args.pred_dir, args.gt_dir], "--json", args.overwrite)
    report = evaluate_folders(args.pred_dir, args.gt_dir, instance_settings_from(args),
                              progress=ProgressLine("evaluate"))
    if report.get("note"):
        print(report["note"], file=sys.stderr)
    print(f"{'class':<14}{'IoU':>8}{'Dice':>8}{'Prec':>8}{'Recall':>8}{'PQ':>8}{'F1':>8}{'GT obj':>8}{'Pred obj':>9}")
    for name, row in report["per_class"].items():
        print(f"{name:<14}{_fmt(row['iou']):>8}{_fmt(row['dice']):>8}{_fmt(row['precision']):>8}"
              f"{_fmt(row['recall']):>8}{_fmt(row['pq']):>8}{_fmt(row['f1']):>8}{row['gt_objects']:>8}{row['pred_objects']:>9}")
    o = report["overall"]
    print(f"nucleus Dice {_fmt(o['nucleus_dice'])}  mIoU {_fmt(o['miou'])}  pixel accuracy {_fmt(o['pixel_accuracy'])}  "
          f"bPQ {_fmt(o['bpq'])}  mPQ {_fmt(o['mpq'])}  mPQ+ {_fmt(o['mpq_plus'])}  F1 {_fmt(o['f1'])}  "
          f"AJI {_fmt(o['aji'])}  ({counted(report['images'], 'image')}; aggregations in the JSON)")
    # the table lists background too: say which rows the means are over
    print("mIoU and mPQ: means over the nucleus classes (background left out); F1: detection at IoU > 0.5, all nuclei")
    if args.json:
        text = report_json(report)
        atomic_write(Path(args.json), lambda tmp: tmp.write_text(text))
        print(f"wrote {args.json}")
    return 0
