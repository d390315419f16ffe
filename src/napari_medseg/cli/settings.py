"""Options -> the core's settings classes (only the options given: each default lives in its class),
and the note where --pixel-size cannot rescale."""

from __future__ import annotations

import sys

from ..errors import MedsegError
from .values import NO_PIXEL_SIZE


# option -> setting, for the options whose default is their settings class's (one place for each default):
# they parse to None when not given, and only the given ones reach the settings
TILE_OPTIONS = {"tile": "tile_size", "overlap": "overlap", "batch_size": "batch_size", "blend": "blend",
                "network_zoom": "network_zoom"}
CLEANUP_OPTIONS = {"min_object_size": "min_object_size", "fill_holes": "max_hole_size"}
INSTANCE_OPTIONS = {"min_distance": "min_distance", "min_size": "min_size", "marker_threshold": "marker_threshold",
                    "min_marker_size": "min_marker_size"}


def given_options(args, options: dict[str, str]) -> dict:
    """``{setting: value}`` of the ``options`` given on the command line."""
    values = {setting: getattr(args, option, None) for option, setting in options.items()}
    return {setting: value for setting, value in values.items() if value is not None}


def tile_settings_from(args):
    from ..inference.settings import TileSettings

    return TileSettings(**given_options(args, TILE_OPTIONS), tta=args.tta, skip_background=not args.no_skip_background,
                        amp=not args.no_amp)


def instance_settings_from(args):
    from ..nuclei.watershed import InstanceSettings

    return InstanceSettings(**given_options(args, INSTANCE_OPTIONS))


def batch_settings_from(args):
    """``medseg predict``'s options as the settings of ``predict_to_folder``."""
    from ..inference.batch import BatchSettings
    from ..inference.postprocess import PostprocessSettings

    return BatchSettings(tile_settings_from(args), PostprocessSettings(**given_options(args, CLEANUP_OPTIONS)),
                         nuclei=not args.no_instances, instance_overrides=given_options(args, INSTANCE_OPTIONS),
                         probabilities=args.probabilities, foreground_threshold=args.foreground_threshold,
                         class_weights=args.class_weights,
                         pixel_size_um=args.pixel_size if args.pixel_size != NO_PIXEL_SIZE else None,
                         use_file_pixel_size=args.pixel_size != NO_PIXEL_SIZE)


def unscaled_pixel_size_note(args) -> None:
    """``--pixel-size UM`` for a model that records none (trained without ``pixel_size_um``): there
    is no size to rescale to, so the images run as they are; said, not ignored without a word."""
    from ..models import read_meta, resolve_model_path

    if not isinstance(args.pixel_size, float):
        return
    try:
        recorded = read_meta(resolve_model_path(args.model)).pixel_size_um
    except MedsegError:
        return  # the model's load says what is wrong with it
    if recorded is None:
        print(f"medseg: note: the model records no pixel size, so --pixel-size {args.pixel_size:g} rescales nothing: "
              "images run at their own scale (train with pixel_size_um set, or fine-tune a model that records one)",
              file=sys.stderr)
