"""``medseg predict --region / --whole-slide``: whole slides into zarr / OME-TIFF pyramids, GeoJSON and CSV."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from ..errors import MedsegError
from ..wording import counted
from .settings import CLEANUP_OPTIONS, INSTANCE_OPTIONS, given_options, tile_settings_from, unscaled_pixel_size_note
from .terminal import ProgressLine
from .values import NO_PIXEL_SIZE


def predict_slide_files(args) -> int:
    """Whole slides (or a region of each) into OUT: zarr pyramids, OME-TIFFs, GeoJSON, CSV."""
    from ..inference import Segmenter
    from ..inference.batch import check_writable_folder
    from ..inference.postprocess import PostprocessSettings
    from ..inference.regions import Region, TissueSettings
    from ..inference.slide import predict_slide
    from ..io.images import file_stem
    from ..io.outputs import OutputWriteError, check_given_once, check_not_input, check_unique_stems
    from ..io.slide_outputs import check_no_slide_results
    from ..io.slides import is_slide_path, open_slide
    from ..memory import limit_allocator_arenas
    from ..steps import Cancelled

    limit_allocator_arenas()  # before the runtime's threads exist: flat memory over the run (``memory``)

    slides = [Path(i) for i in args.inputs]
    missing = [str(s) for s in slides if not s.exists()]
    if missing:
        raise MedsegError(f"no such file: {', '.join(missing)}.")
    not_slides = [str(s) for s in slides if not is_slide_path(s)]
    if not_slides:
        raise MedsegError(f"--region / --whole-slide take whole-slide files; not slides: {', '.join(not_slides)}.")
    if not (args.region or args.whole_slide):
        raise MedsegError("a whole slide needs --region X,Y,W,H (level-0 px) or --whole-slide.")
    if args.probabilities:
        raise MedsegError("--probabilities is for images: a slide's would be classes x its whole size; its class "
                          "map and nuclei are written as pyramids instead (drop --probabilities).")
    region = Region.parse(args.region) if args.region else None
    out = Path(args.out)
    check_not_input(out, slides, ())
    # before hours of work on the first slide: a later one would be refused, or overwrite it
    check_given_once(slides, out, file_stem, "slide")
    check_unique_stems(slides, file_stem)
    for path in slides:
        check_no_slide_results(out, file_stem(path))
    check_writable_folder(out)  # once, before the model loads (not 'skipped' for each slide, naming a temp file)
    if args.pixel_size == NO_PIXEL_SIZE:  # before the model loads (it had taken 10 s to be told)
        raise MedsegError("--pixel-size none: slides are segmented at the pixel size they record; to override it "
                          "give a number (e.g. --pixel-size 0.25).")
    failed = _unreadable_slides(slides, region)  # said before the model loads (a cut-off file had waited for it)
    unscaled_pixel_size_note(args)
    if len(failed) == len(slides):
        print(f"medseg: {len(failed)} of {counted(len(slides), 'slide')} not segmented: {', '.join(p.name for p in failed)}",
              file=sys.stderr)
        return 1
    # by the runtime alone where an earlier load on this machine recorded its choice: no torch in
    # this process (about 0.65 GB less over a whole slide); else loaded, checked and recorded
    segmenter = Segmenter.load(args.model, device=args.device, backend=args.backend, precision=args.precision,
                               recorded=True)
    if args.foreground_threshold is not None:
        segmenter.foreground_threshold = None if args.foreground_threshold == "argmax" else args.foreground_threshold
    if args.class_weights is not None:
        from ..inference.batch import use_class_weights

        use_class_weights(segmenter, args.class_weights)
    # --no-skip-background: every block is segmented, glass and faint tissue alike
    tissue = TissueSettings(enabled=not args.no_skip_background)
    for path in slides:
        if path in failed:
            continue
        try:
            slide = open_slide(path)
            if args.pixel_size is not None:
                slide = replace(slide, pixel_size_um=args.pixel_size)
            result = predict_slide(segmenter, slide, out, region, progress=ProgressLine(path.name),
                                   settings=tile_settings_from(args),
                                   instance_settings=segmenter.instance_settings_with(given_options(args, INSTANCE_OPTIONS)),
                                   postprocess=PostprocessSettings(**given_options(args, CLEANUP_OPTIONS)),
                                   nuclei=not args.no_instances, tissue_settings=tissue, flag="--out")
        except (Cancelled, OutputWriteError):  # the output folder (a full disk) fails every slide alike: stop
            raise
        except MedsegError as exc:  # a broken or odd slide: said, and the others still run
            print(f"medseg: skipped {path}: {exc}", file=sys.stderr)
            failed.append(path)
            continue
        counts = ", ".join(f"{name} {n}" for name, n in result.counts.items())
        found = "" if args.no_instances else f", {result.nuclei} nuclei ({counts})"
        r = result.region
        # without the tissue finder every block counts as tissue: '100% tissue' had been claimed of glass
        tissue_words = ("tissue not looked for (--no-skip-background: every block segmented)" if args.no_skip_background
                        else f"{100 * result.tissue_fraction:.0f}% tissue")
        print(f"{path.name}: region {r.x},{r.y},{r.width},{r.height}, {tissue_words}{found}")
        if region is not None and r != region:  # not silently: a typo'd size had run on the whole slide
            height, width = slide.shape
            print(f"  {path.name}: --region {args.region} reaches past the slide ({width}x{height} px): "
                  f"clipped to {r.x},{r.y},{r.width},{r.height}", file=sys.stderr)
        for note in result.notes:
            print(f"  {path.name}: {note}", file=sys.stderr)
        for kind, file in result.files.items():
            print(f"  {kind}: {file}")
    if failed:
        print(f"medseg: {len(failed)} of {counted(len(slides), 'slide')} not segmented: {', '.join(p.name for p in failed)}",
              file=sys.stderr)
    return 1 if failed else 0


def _unreadable_slides(slides: list[Path], region) -> list[Path]:
    """The slides that cannot be opened, or that ``region`` is not on, each said as skipped (their
    headers are read: nothing is decoded)."""
    from ..io.slides import open_slide

    failed = []
    for path in slides:
        try:
            shape = open_slide(path).shape
            if region is not None:
                region.checked(shape)
        except MedsegError as exc:
            print(f"medseg: skipped {path}: {exc}", file=sys.stderr)
            failed.append(path)
    return failed
