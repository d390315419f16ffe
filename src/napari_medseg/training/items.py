"""One labelled training image, as every source gives it (dataset folders, PanNuke folds, viewer
layers): plain arrays, no runtime needed to make one."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class LabelledImage:
    name: str
    group: str  # source image: the unit of the train/validation split
    image: np.ndarray  # float32 (H, W, C) in [0, 1]
    labels: np.ndarray  # uint8 (H, W)
    instances: np.ndarray | None = None  # nucleus ids (H, W), 0 = background: targets of a distance head
    dataset: str = ""  # the dataset folder's name (validation reports each set on its own)
    binary: bool = False  # labels are BINARY_BACKGROUND / BINARY_NUCLEUS codes (training/mixed.py)
    distance_trust: str = "all"  # which of its instances train the distance head (DatasetSpec.distance)
    pixel_size_um: float | None = None  # µm/px its file or layer records; None: unknown (taken as the run's)
