"""The classical baseline (haematoxylin deconvolution, Otsu, watershed) on real CoNSeP patches."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medseg.nuclei.classical import BaselineInputError, ClassicalSettings, as_unclassified, classical_foreground, classical_nuclei, haematoxylin
from napari_medseg.evaluation.report import PairEvaluation
from napari_medseg.io.dataset import open_dataset

# patches of the default model's held-out source images (train_12, 19, 22, 25), 2 each
STEMS = [f"train_{i}_{j:03d}" for i in (12, 19, 22, 25) for j in (5, 10)]


@pytest.fixture(scope="module")
def samples(consep):
    folder = open_dataset(consep, require_labels=True)
    return folder.classes, [folder.load(s) for s in STEMS]


def _nucleus_dice(samples, predict) -> float:
    evaluation = PairEvaluation(["background", "nucleus"])
    for s in samples:
        evaluation.add(s.stem, (s.labels > 0).astype(np.uint8), predict(s).astype(np.uint8))
    return evaluation.report()["overall"]["nucleus_dice"]


def test_outputs_are_consistent_binary_maps(samples):
    _, items = samples
    class_map, instances = classical_nuclei(items[0].image)
    assert class_map.dtype == np.uint8 and instances.dtype == np.int32
    assert class_map.shape == instances.shape == items[0].image.shape[:2]
    assert set(np.unique(class_map)) <= {0, 1}
    np.testing.assert_array_equal(class_map > 0, instances > 0)
    ids = np.unique(instances)[1:]
    assert len(ids) >= 5 and ids.max() == len(ids)  # several nuclei, ids 1..N
    # every instance is at least the watershed's minimum size
    assert np.bincount(instances.ravel())[1:].min() >= ClassicalSettings().instance_settings.min_size


def test_real_dice_far_above_trivial_answers(samples):
    _, items = samples
    dice = _nucleus_dice(items, lambda s: classical_nuclei(s.image)[0])
    all_fg = _nucleus_dice(items, lambda s: np.ones_like(s.labels))
    # a mask of the right pixel share but no spatial sense: the ground truth of a patch of another source image
    shuffled = _nucleus_dice(items, lambda s: items[(items.index(s) + 2) % len(items)].labels > 0)
    all_bg = _nucleus_dice(items, lambda s: np.zeros_like(s.labels))
    assert all_bg == 0.0
    trivial = max(all_fg, shuffled)
    assert trivial < 0.45, (all_fg, shuffled)
    # measured: 0.69 here (0.63 on the whole 64-patch validation split); trivial answers 0.33 / 0.27
    assert dice > 0.6, dice
    assert dice > trivial + 0.25, (dice, all_fg, shuffled)


def test_haematoxylin_is_high_in_nuclei(samples):
    _, items = samples
    for s in items[:4]:
        h = haematoxylin(s.image)
        assert h[s.labels > 0].mean() > h[s.labels == 0].mean()


def test_float_input_gives_the_same_answer_as_uint8(samples):
    _, items = samples
    image = items[1].image
    a, _ = classical_nuclei(image)
    b, _ = classical_nuclei(image.astype(np.float32) / 255.0)
    assert (a != b).mean() < 1e-3  # float32 rounding only
    c, _ = classical_nuclei(np.dstack([image, np.full(image.shape[:2], 255, np.uint8)]))  # RGBA: alpha dropped
    np.testing.assert_array_equal(a, c)


def test_blank_image_has_no_nuclei():
    class_map, instances = classical_nuclei(np.full((64, 64, 3), 230, np.uint8))
    assert not class_map.any() and not instances.any()


def test_settings_change_the_result(samples):
    _, items = samples
    image = items[2].image
    strict = classical_foreground(image, ClassicalSettings(threshold_scale=1.5))
    loose = classical_foreground(image, ClassicalSettings(threshold_scale=0.7))
    assert strict.sum() < loose.sum()


@pytest.mark.parametrize("image, message", [
    (np.zeros((32, 32), np.uint8), "gray image"),
    (np.zeros((32, 32, 1), np.uint8), "gray image"),
    (np.zeros((3, 32, 32), np.uint8), "channels first"),
    (np.zeros((32, 32, 5), np.uint8), "Expected an \\(H, W, 3\\) RGB image"),
    (np.zeros((4, 32, 32, 3), np.uint8), "Expected an \\(H, W, 3\\) RGB image"),
    (np.zeros((1, 32, 3), np.uint8), "too small"),
    (np.zeros((32, 32, 3), np.uint16), "Unsupported pixel type uint16"),
    (np.zeros((32, 32, 3), bool), "Unsupported pixel type bool"),
    (np.full((32, 32, 3), 2.0), "values in \\[0, 1\\]"),
    (np.full((32, 32, 3), np.nan), "NaN"),
])
def test_bad_input_is_refused_clearly(image, message):
    with pytest.raises(BaselineInputError, match=message):
        classical_nuclei(image)


def test_unclassified_nuclei_count_in_binary_numbers_only(samples):
    classes, items = samples
    s = items[0]
    class_map, instances = classical_nuclei(s.image)
    pred = as_unclassified(class_map, len(classes))
    assert set(np.unique(pred)) <= {0, len(classes)}
    evaluation = PairEvaluation(classes + ["unclassified"])
    evaluation.add(s.stem, s.labels, pred, s.instances, instances)
    report = evaluation.report()
    binary = PairEvaluation(["background", "nucleus"])
    binary.add(s.stem, (s.labels > 0).astype(np.uint8), class_map, s.instances, instances)
    assert report["overall"]["nucleus_dice"] == pytest.approx(binary.report()["overall"]["nucleus_dice"])
    assert report["overall"]["bpq"] == pytest.approx(binary.report()["overall"]["bpq"])
    for name in classes[1:]:  # no class is claimed, so none is found
        assert report["per_class"][name]["iou"] in (0.0,) or np.isnan(report["per_class"][name]["iou"])
    assert as_unclassified(class_map, 2) is not class_map and (as_unclassified(class_map, 2) == class_map).all()


def test_baseline_is_core_without_gui_or_torch():
    import subprocess
    import sys

    code = ("import sys, napari_medseg.nuclei.classical\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('napari', 'qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'magicgui', 'superqt', 'vispy', 'torch'))\n"
            "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"napari_medseg.nuclei.classical imported: {out.stdout}"
