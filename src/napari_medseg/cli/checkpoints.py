"""``medseg average`` and ``medseg info``: a checkpoint mixed with its start, a checkpoint described."""

from __future__ import annotations

import json

from ..errors import MedsegError


def cmd_average(args) -> int:
    from ..models import resolve_model_path
    from ..training.average import average_checkpoints
    from ..training.stages import load_train_stages

    if args.config and args.batchnorm != "measure" and args.threshold != "tune":
        raise MedsegError("--config is read for --batchnorm measure or --threshold tune, and neither was asked: "
                          "add one of them, or drop --config (weights, batch norm and the tuned model's threshold "
                          "are averaged / kept without it).")
    # stages share their data: the first stage's config has the split and the crops
    cfg = load_train_stages(args.config, list(args.set or []))[0].config if args.config else None
    done = average_checkpoints(resolve_model_path(args.start), resolve_model_path(args.tuned), args.weight, args.out,
                               cfg, batchnorm=args.batchnorm, threshold=args.threshold, crops=args.crops,
                               device=args.device, recorded_as=(args.start, args.tuned))
    norm = (f"batch norm measured on {done.bn_crops} training crops" if done.bn_crops
            else "batch norm averaged with the weights")
    chosen = "argmax (no threshold)" if done.threshold is None else f"{done.threshold:.2f}"
    tuned = (f" (tuned: pooled nucleus Dice {done.tuning['nucleus_dice']:.4f} on {done.tuning['images']} validation "
             "images)") if done.tuning else ""
    print(f"{1 - done.weight:.2f} x {args.start} + {done.weight:.2f} x {args.tuned}; {norm}; foreground threshold "
          f"{chosen}{tuned}")
    print(f"wrote {done.path}")
    return 0


def cmd_info(args) -> int:
    from ..models import read_meta, resolve_model_path

    path = resolve_model_path(args.model)
    meta = read_meta(path)
    if not (args.json or args.history):  # a summary first: the whole record is ~600 lines of JSON
        from ..evaluation.checkpoint_summary import checkpoint_summary

        print("\n".join(checkpoint_summary(path, meta, args.model)))
        return 0
    data = {k: v for k, v in meta.__dict__.items() if k != "training"}
    data["model"] = meta.model.to_dict()
    training = dict(meta.training or {})
    history = training.get("history")
    if isinstance(history, list) and not args.history:  # every epoch's record: 40 kB of JSON; the best one here
        best = training.get("best_epoch")
        training["history"] = {"epochs": len(history), "best_epoch_record": next(
            (r for r in history if isinstance(r, dict) and r.get("epoch") == best), None),
            "all": "medseg info --history"}
    data["training"] = training
    print(json.dumps(data, indent=1, default=str))
    return 0
