"""``medseg convert``: PanNuke folds, folders of masks and QuPath outlines to dataset folders."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import MedsegError
from ..wording import counted
from .terminal import ProgressLine


def cmd_convert(args) -> int:
    if args.format == "geojson":
        return _convert_geojson(args)
    if args.image or args.classes or args.origin or args.overwrite:
        raise MedsegError("--image, --classes, --origin and --overwrite are for `medseg convert geojson`; a PanNuke "
                          "fold or a folder of masks holds its images, and goes to a folder of its own.")
    if args.format == "masks":
        return _convert_masks(args)
    from ..io.pannuke import convert_pannuke

    out = convert_pannuke(args.source, args.out_dir, progress=ProgressLine("convert"))
    print(f"wrote dataset folder {out}")
    return 0


def _convert_masks(args) -> int:
    from ..evaluation.mask_folder import masks_to_dataset

    done = masks_to_dataset(args.source, args.out_dir)
    read = ", ".join(f"{n} as {reading}" for reading, n in done.readings.items())
    print(f"wrote {counted(done.images, 'image')} into dataset folder {args.out_dir} (background, nucleus): masks "
          f"read {read}")
    for names, said in ((done.without_mask, "without a mask beside it left out"),
                        (done.without_image, "without an image of its name left out"),
                        (done.mostly_nucleus, "marking most of its image as nucleus (inverted? nucleus must be "
                                              "the non-zero value)")):
        if names:
            what = "mask" if names is not done.without_mask else "image"
            print(f"medseg: {counted(len(names), what)} {said}: {', '.join(names[:5])}"
                  f"{' ...' if len(names) > 5 else ''}", file=sys.stderr)
    print(f"medseg: fine-tune the default on it with data.datasets: [{{path: {args.out_dir}, labels: binary}}] "
          f"(its nuclei, not its classes), or score predictions: medseg evaluate PREDICTIONS/ {args.out_dir}",
          file=sys.stderr)
    return 0


def _convert_geojson(args) -> int:
    from ..io.geojson_read import geojson_to_dataset

    if not args.image:
        raise MedsegError("convert geojson needs --image IMAGE: the image the outlines were drawn on (its size, "
                          "pixel size and pixels go into the dataset folder beside them).")
    done = geojson_to_dataset(args.source, args.image, args.out_dir, _classes_of(args.classes),
                              args.origin or (0.0, 0.0), overwrite=args.overwrite)
    from ..io.geojson_read import MAX_NUCLEUS_AREA_UM2, OUTSIDE, TOO_LARGE

    per_class = ", ".join(f"{name} {n}" for name, n in done.counts.items())
    print(f"wrote '{done.stem}' into dataset folder {args.out_dir}: {counted(done.objects, 'outline')}"
          f"{f' ({per_class})' if per_class else ' (a field without nuclei)'}; classes {', '.join(done.classes[1:])}")
    outside, large = done.left_out[OUTSIDE], done.left_out[TOO_LARGE]
    if outside:
        print(f"medseg: {counted(outside, 'outline')} of {done.objects + outside + large} "
              f"{'lies' if outside == 1 else 'lie'} wholly outside the image, not painted: if most do, it is not the "
              "image they were drawn on (outlines of a slide region need its top-left corner as --origin X,Y)",
              file=sys.stderr)
    if large:
        print(f"medseg: {counted(large, 'outline')} larger than {MAX_NUCLEUS_AREA_UM2:g} µm² left out: regions "
              "drawn around nuclei, not nuclei", file=sys.stderr)
    if done.skipped:
        kinds = ", ".join(f"{n} {kind}" for kind, n in done.skipped.items())
        print(f"medseg: skipped objects that are not areas ({kinds})", file=sys.stderr)
    if not args.classes:
        print("medseg: to score a model's predictions against it, the classes must be the model's: convert with "
              "--classes default (or the model's checkpoint)", file=sys.stderr)
    return 0


def _classes_of(given: list[str] | None) -> list[str] | None:
    """``--classes``: names, or one model (``default``, a checkpoint) or dataset folder whose classes
    to take, so that the ground truth's ids are the model's (``medseg evaluate`` compares ids)."""
    if not given or len(given) > 1 or not (given[0] == "default" or Path(given[0]).exists()):
        return given
    from ..io.dataset import read_classes
    from ..models import read_meta, resolve_model_path

    if Path(given[0]).is_dir():
        return read_classes(Path(given[0]))[0]
    return list(read_meta(resolve_model_path(given[0])).classes)
