"""``medseg tune-threshold``, ``tune-classes`` and ``tune-nuclei``: a model's settings chosen on labelled images."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import MedsegError
from ..wording import counted
from .terminal import ProgressLine


FEW_TUNING_IMAGES = 5  # fewer than this: a value chosen fits those images more than the next ones


def few_images_caution(images: int) -> None:
    if images < FEW_TUNING_IMAGES:
        print(f"medseg: caution: tuned on {counted(images, 'image')}; a choice made on so few may not hold on "
              "others (tune on more images, of several source images)", file=sys.stderr)


def _model_first(args) -> None:
    """The tuners take the model first: a dataset folder given there is said as such (it had been
    'Checkpoint ... is a folder, not a file')."""
    if Path(args.model).is_dir() and (Path(args.model) / "images").is_dir():
        raise MedsegError(f"'{args.model}' is a dataset folder: the model comes first, then the data: "
                          f"medseg {args.command} MODEL DATASET (MODEL: 'default' or a .safetensors file).")


def cmd_tune_threshold(args) -> int:
    from ..evaluation.threshold import tune_checkpoint

    _model_first(args)
    result = tune_checkpoint(args.model, args.data, args.out, groups=args.groups, all_images=args.all_images,
                             tta=args.tta, device=args.device, overwrite=args.overwrite,
                             progress_for=lambda images: ProgressLine(f"tuning on {counted(images, 'image')}"))
    print(f"foreground threshold {result['threshold']:.2f}: pooled nucleus Dice {result['nucleus_dice']:.4f} "
          f"(argmax {result['argmax_nucleus_dice']:.4f}) on {counted(result['images'], 'image')}")
    few_images_caution(result["images"])
    print(f"wrote {args.out}")
    return 0


def cmd_tune_classes(args) -> int:
    from ..evaluation.class_choice import tune_classes_checkpoint

    _model_first(args)
    result = tune_classes_checkpoint(args.model, args.data, args.out, groups=args.groups, all_images=args.all_images,
                                     tta=args.tta, device=args.device, overwrite=args.overwrite,
                                     progress_for=lambda steps: ProgressLine("tune-classes: each image, then each weight"))
    before, tuned = result["before"], result["tuned"]
    own = result["own_weights"]
    print("class weights: " + ", ".join(f"{c} {w:g}" for c, w in zip(before["f1"], result["weights"]))
          + ("" if all(w == 1.0 for w in own) else
             " (the model's own: " + ", ".join(f"{c} {w:g}" for c, w in zip(before["f1"], own)) + ")"))
    print(f"on the {counted(result['images'], 'tuning image')}, from the model as it is: "
          f"mPQ {before['mpq']:.4f} -> {tuned['mpq']:.4f}, "
          f"class mIoU {before['miou']:.4f} -> {tuned['miou']:.4f}; bPQ {tuned['bpq']:.4f} (unchanged: the nuclei "
          "stay as they are)")
    print("  F1 per class: " + ", ".join(f"{c} {before['f1'][c]:.3f} -> {tuned['f1'][c]:.3f}" for c in before["f1"]))
    held = result.get("cross_validated")
    if held:
        print(f"each of the {result['source_images']} source images with weights chosen on the others only: "
              f"mPQ {before['mpq']:.4f} -> {held['mpq']:.4f}, class mIoU {before['miou']:.4f} -> {held['miou']:.4f}")
    else:
        print("one source image: no image left to check the choice on (give images of several)")
    print(f"wrote {args.out}")
    return 0


def cmd_tune_nuclei(args) -> int:
    from ..evaluation.instance_tuning import tune_nuclei_checkpoint

    _model_first(args)
    result = tune_nuclei_checkpoint(args.model, args.data, args.out, groups=args.groups, all_images=args.all_images,
                                    tta=args.tta, device=args.device, overwrite=args.overwrite,
                                    progress_for=lambda steps: ProgressLine("tune-nuclei: each image, then each setting"))
    for name in result["left_out"]:
        print(f"{name}: none of its images is among the tuning images; left out")
    before, chosen = result["before"], result["settings"]
    words = {"marker_threshold": "marker threshold", "min_size": "smallest nucleus (px)",
             "min_marker_size": "smallest seed (px)"}
    print(f"chosen of {result['candidates']} settings (the weakest set's bPQ): "
          + ", ".join(f"{words[k]} {before['settings'][k]} -> {v}" for k, v in chosen.items()))
    for name, images in result["images"].items():
        print(f"  {name} ({counted(images, 'image')}): bPQ {before['bpq'][name]:.4f} -> {result['bpq'][name]:.4f}")
    few_images_caution(min(result["images"].values(), default=0))
    print(f"wrote {args.out}")
    return 0
