"""The torch-free bilinear resize against torch's own (``F.interpolate``), on real H&E and on
probability-like planes, enlarging, shrinking, mixed and non-integer factors."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_medseg.inference.rescale import resample
from napari_medseg.inference.resize import resize_bilinear
from napari_medseg.io.images import read_image

SAMPLE = Path(__file__).resolve().parents[1] / "src" / "napari_medseg" / "sample_data" / "consep_train_19_005.png"


def _torch(planes: np.ndarray, shape) -> np.ndarray:
    shrinking = shape[0] < planes.shape[1] or shape[1] < planes.shape[2]
    return F.interpolate(torch.from_numpy(planes)[None], size=tuple(shape), mode="bilinear", align_corners=False,
                         antialias=shrinking)[0].numpy()


@pytest.fixture(scope="module")
def he_planes() -> np.ndarray:
    image = read_image(SAMPLE)[:200, :160, :3].astype(np.float32) / 255
    return np.ascontiguousarray(image.transpose(2, 0, 1))


@pytest.mark.parametrize("shape", [(400, 320), (100, 80), (137, 211), (333, 59), (200, 160), (1, 7), (201, 161)])
def test_resize_matches_torch_on_he(he_planes, shape):
    expected = _torch(he_planes, shape)
    got = resize_bilinear(he_planes, shape)
    assert got.shape == expected.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=2e-5)


def test_resize_matches_torch_on_probabilities():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 97, 131)).astype(np.float32)
    planes = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
    for shape in [(48, 65), (194, 262), (31, 400), (97, 131)]:
        got = resize_bilinear(planes, shape)
        np.testing.assert_allclose(got, _torch(planes, shape), atol=2e-5)
        np.testing.assert_allclose(got.sum(0), 1.0, atol=1e-4)  # a mean of distributions stays one


def test_resample_is_the_same_without_torch(he_planes, monkeypatch):
    """``rescale.resample`` takes torch's kernel where torch is loaded and ``resize`` elsewhere:
    the same image either way (the slide process without torch and a script with it agree)."""
    image = np.ascontiguousarray(he_planes.transpose(1, 2, 0))
    with_torch = resample(image, (300, 240), channels_last=True)
    monkeypatch.delitem(__import__("sys").modules, "torch")
    without = resample(image, (300, 240), channels_last=True)
    np.testing.assert_allclose(without, with_torch, atol=2e-5)
    assert without.shape == (300, 240, 3)
