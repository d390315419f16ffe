"""Reading and writing images, label maps, dataset folders and PanNuke folds."""

from .images import (
    IMAGE_SUFFIXES,
    ImageReadError,
    image_suffix,
    read_image,
    read_label_map,
    to_rgb_float,
    validate_image_array,
    write_label_map,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageReadError",
    "image_suffix",
    "read_image",
    "read_label_map",
    "to_rgb_float",
    "validate_image_array",
    "write_label_map",
]
