"""``medseg predict`` on images, folders and dataset folders (slides: ``predict_slides``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..errors import MedsegError
from ..wording import counted
from .predict_slides import predict_slide_files
from .settings import batch_settings_from, unscaled_pixel_size_note
from .terminal import ProgressLine


# image formats a microscope or an editor may leave in a folder that medseg does not read
UNREAD_IMAGE_SUFFIXES = (".bmp", ".gif", ".webp", ".jp2", ".j2k", ".heic", ".czi", ".nd2", ".lif", ".vsi", ".dcm")


def _collect_inputs(inputs: list[str]) -> list[Path]:
    """The image files ``inputs`` name (folders and dataset folders opened), each once."""
    from ..io.dataset import is_dataset_folder
    from ..io.images import IMAGE_SUFFIXES, LABEL_NAME_ENDINGS, file_stem

    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if is_dataset_folder(path):
            path = path / "images"
        if path.is_dir():
            from ..io.slides import SLIDE_SUFFIXES

            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            # b_mask.png beside b.png is its annotation: segmented as an image, it had drawn 'fluorescence?' notes
            masks = [p for p in found if file_stem(p).lower().endswith(LABEL_NAME_ENDINGS)]
            if masks and len(masks) < len(found):
                found = [p for p in found if p not in masks]
                print(f"medseg: {path} also holds {counted(len(masks), 'label map')} named as such "
                      f"({', '.join(p.name for p in masks[:3])}{' ...' if len(masks) > 3 else ''}), not segmented; "
                      "give a file by name to segment it anyway.", file=sys.stderr)
            slides = sorted(p.name for p in path.iterdir()
                            if p.suffix.lower() in SLIDE_SUFFIXES and p.suffix.lower() not in IMAGE_SUFFIXES)
            others = sorted(p.name for p in path.iterdir() if p.suffix.lower() in UNREAD_IMAGE_SUFFIXES)
            if found and others:  # left out without a word, while the same file given alone was named
                print(f"medseg: {path} also holds {counted(len(others), 'image')} in formats not read here "
                      f"({', '.join(others[:3])}{' ...' if len(others) > 3 else ''}), skipped: save them as PNG or "
                      "TIFF to segment them.", file=sys.stderr)
            if found and slides:  # they had been left out without a word
                print(f"medseg: {path} also holds {counted(len(slides), 'whole slide')} ({', '.join(slides[:3])}"
                      f"{' ...' if len(slides) > 3 else ''}), not segmented with its images: give each slide file "
                      "with --region X,Y,W,H or --whole-slide.", file=sys.stderr)
            if not found:
                hint = (f" It holds whole slides ({', '.join(slides[:3])}{' ...' if len(slides) > 3 else ''}): "
                        "give each file with --region X,Y,W,H or --whole-slide." if slides else "")
                raise MedsegError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {path}.{hint}")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise MedsegError(f"'{item}' does not exist.")
    # a file named twice (or in a folder also given) is segmented once: twice was twice the time,
    # and 'wrote 2 class maps' for one
    unique = {os.path.realpath(f): f for f in reversed(files)}
    return [f for f in files if unique[os.path.realpath(f)] is f]


def cmd_predict(args) -> int:
    from ..inference.batch import predict_to_folder

    from ..io.slides import SLIDE_SUFFIXES

    # vendor slides always take the slide path; a pyramidal TIFF does with --region / --whole-slide
    # (without, it streams like any large image)
    if args.region or args.whole_slide or any(Path(i).suffix.lower() in SLIDE_SUFFIXES for i in args.inputs):
        return predict_slide_files(args)
    files = _collect_inputs(args.inputs)
    unscaled_pixel_size_note(args)
    out = Path(args.out)
    failures, said, finished, unsized = 0, set(), 0, 0
    try:
        for done in predict_to_folder(files, out, args.model, batch_settings_from(args), device=args.device,
                                      source=f"medseg predict --model {args.model}",
                                      progress_for=lambda i, n, file: ProgressLine(f"[{i}/{n}] {file.name}"),
                                      backend=args.backend, precision=args.precision):
            failures += _print_prediction(done, with_instances=not args.no_instances, said=said)
            unsized += done.skipped is None and done.pixel_size_um is None
            finished += 1
    except KeyboardInterrupt:
        if failures < finished < len(files):  # what is in OUT, whole: the interrupted image's results are not
            print(f"medseg predict: interrupted at image {finished + 1} of {len(files)} ({files[finished].name}); the "
                  f"results of the {counted(finished - failures, 'image')} before it are whole in {out}",
                  file=sys.stderr)
        raise
    if failures == len(files):  # nothing was written: not 'to OUT/labels', a folder it did not make
        what = "the file could not be read" if failures == 1 else f"none of the {failures} files could be read"
        print(f"wrote no class map: {what} (above)")
        return 1
    written = len(files) - failures
    _unknown_pixel_size_note(args, unsized, written)
    print(f"wrote {counted(written, 'class map')} to {out / 'labels'}"
          + ("" if args.no_instances else f", {counted(written, 'instance map')} to {out / 'instances'} and each "
             f"image's nuclei (a CSV table, QuPath GeoJSON outlines) to {out / 'nuclei'}"))
    earlier = _earlier_results(out, files)
    if earlier:  # kept (never removed: their images were not given), but 'medseg evaluate OUT' scores them too
        print(f"  {out} also holds earlier runs' results of {counted(len(earlier), 'other image')} ({', '.join(earlier[:3])}"
              f"{' ...' if len(earlier) > 3 else ''}), kept as they were", file=sys.stderr)
    return 1 if failures else 0


def _unknown_pixel_size_note(args, unsized: int, written: int) -> None:
    """Once a run, not under every file: images that record no pixel size (PNG and JPEG never do)
    were taken as the model's, unless --pixel-size said how to take them."""
    from ..io.pixel_size import unknown_pixel_size_note
    from ..models import read_meta, resolve_model_path

    if not unsized or args.pixel_size is not None:
        return
    model_size = read_meta(resolve_model_path(args.model)).pixel_size_um
    if model_size:
        what = "the image records" if written == 1 else f"{unsized} of the {written} images record"
        print("medseg: note: " + unknown_pixel_size_note(
            model_size, what, "give --pixel-size UM (0.5 at 20x), or --pixel-size none to take them as they are "
            "without this note"), file=sys.stderr)


def _earlier_results(out: Path, files: list[Path]) -> list[str]:
    """The stems of class maps in ``out/labels`` of images other than ``files`` (earlier runs')."""
    from ..io.images import file_stem

    ours = {file_stem(f) for f in files}
    labels = out / "labels"
    held = sorted(p for p in labels.iterdir() if p.is_file() and not p.name.startswith(".")) if labels.is_dir() else []
    return [p.name for p in held if file_stem(p) not in ours]


def _print_prediction(done, with_instances: bool, said: set | None = None) -> bool:
    """Prints what became of one file (on stderr, and only what needs saying); whether it was skipped.
    ``said``: the runtime's notes printed so far (each once a run, not under every file)."""
    from ..nuclei.watershed import INSTANCE_MAX_PIXELS

    name = done.file.name
    if done.skipped is not None:
        print(f"medseg: skipped {done.file}: {done.skipped}", file=sys.stderr)
        return True
    report = done.report
    said = set() if said is None else said
    if done.nuclei_per_class is not None:  # as a slide's line and the web page say it
        per_class = done.nuclei_per_class
        print(f"{name}: {counted(sum(per_class.values()), 'nucleus', 'nuclei')}"
              + (f" ({', '.join(f'{c} {n}' for c, n in per_class.items())})" if set(per_class) - {"all"} else ""),
              flush=True)
    for note in done.runtime_notes:
        if note not in said:
            print(f"medseg: runtime: {note}", file=sys.stderr)
            said.add(note)
    notes = [note for note in report.notes if note not in done.runtime_notes]
    if report.skipped_background or notes:
        glass = [f"{report.skipped_background}/{report.tiles} tiles skipped as glass"] if report.skipped_background else []
        extra = "; ".join([*glass, *notes])  # not '0/25 tiles skipped as glass' before each note
        print(f"  {name}: {extra}", file=sys.stderr)
    for path in done.removed:
        print(f"  {name}: removed {path.parent.name}/{path.name}, an earlier run's, of the class map this run "
              "replaced", file=sys.stderr)
    if with_instances and done.instances is None:
        height, width = done.shape
        print(f"  {name}: instances not derived ({height}x{width} px is above "
              f"{INSTANCE_MAX_PIXELS / 1e6:.0f} Mpx; the class map was written)", file=sys.stderr)
    return False
