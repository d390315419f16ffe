"""Augmentation on real CoNSeP H&E: stain jitter against a plain numpy reference and scikit-image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.color import hed_from_rgb, rgb2hed, rgb_from_hed
from torchvision import tv_tensors

from napari_medseg.io import read_image, read_label_map
from napari_medseg.training.augment import RandomStainJitter, build_augmentation
from napari_medseg.training.config import AugmentConfig, TrainConfigError, load_train_config


@pytest.fixture(scope="module")
def he_patch(consep):
    image = read_image(consep / "images" / "train_19_005.png")[..., :3].astype(np.float32) / 255
    labels = read_label_map(consep / "labels" / "train_19_005.tif").astype(np.int64)
    return image, labels


def reference_stain_jitter(rgb: np.ndarray, scale, shift) -> np.ndarray:
    """Slow and obvious, one pixel row at a time: RGB -> OD -> H, E, D -> jitter -> OD -> RGB."""
    out = np.empty_like(rgb, dtype=np.float64)
    for r in range(rgb.shape[0]):
        density = -np.log(np.maximum(rgb[r].astype(np.float64), 1e-6))
        stains = density @ hed_from_rgb
        stains = stains * np.asarray(scale) + np.asarray(shift)
        out[r] = np.clip(np.exp(-(stains @ rgb_from_hed)), 0, 1)
    return out


def _jitter(image: np.ndarray, scale, shift) -> np.ndarray:
    t = RandomStainJitter(0.1)
    x = tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1))
    params = {"scale": torch.tensor(scale, dtype=torch.float32), "shift": torch.tensor(shift, dtype=torch.float32)}
    return t.transform(x, params).permute(1, 2, 0).numpy()


def test_stain_jitter_matches_the_reference(he_patch):
    image, _ = he_patch
    scale, shift = [1.08, 0.93, 1.0], [0.05, -0.04, 0.01]
    np.testing.assert_allclose(_jitter(image, scale, shift), reference_stain_jitter(image, scale, shift), atol=2e-5)


def test_stain_jitter_without_change_gives_the_image_back(he_patch):
    image, _ = he_patch
    np.testing.assert_allclose(_jitter(image, [1, 1, 1], [0, 0, 0]), np.maximum(image, 1e-6), atol=1e-5)


def test_more_haematoxylin_is_seen_by_scikit_image_deconvolution(he_patch):
    image, labels = he_patch
    darker = _jitter(image, [1.3, 1.0, 1.0], [0.0, 0.0, 0.0])
    before, after = rgb2hed(image), rgb2hed(darker)
    nuclei = labels > 0
    assert after[..., 0][nuclei].mean() > 1.2 * before[..., 0][nuclei].mean()  # haematoxylin up by ~30 %
    np.testing.assert_allclose(after[..., 1].mean(), before[..., 1].mean(), rtol=0.05)  # eosin about unchanged


def test_pipeline_with_stain_jitter_keeps_labels_and_range(he_patch):
    image, labels = he_patch
    torch.manual_seed(0)
    cfg = AugmentConfig(flip=False, rotate90=False, scale=None, brightness=0, contrast=0, saturation=0, hue=0, stain=0.1)
    apply = build_augmentation(cfg, 256)
    x, y = apply(torch.from_numpy(image).permute(2, 0, 1).contiguous(), torch.from_numpy(labels))
    assert torch.equal(y, torch.from_numpy(labels))  # no geometry: the labels are untouched
    assert x.shape == (3, 256, 256) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert not torch.allclose(x, torch.from_numpy(image).permute(2, 0, 1), atol=1e-3)  # the colours moved
    grey = tv_tensors.Image(torch.rand(1, 8, 8))
    assert torch.equal(RandomStainJitter(0.1)(grey), grey)  # stains are defined for RGB only


def test_stain_setting_is_checked():
    with pytest.raises(TrainConfigError, match="augment.stain"):
        load_train_config(None, ["augment.stain=1.5"])


def test_stain_scale_draws_log_uniform_factors_in_its_range():
    """Factors from ``stain_scale`` fill [low, high] with log-uniform density (as many below 1
    as above for [0.5, 2]); the shift keeps to +- sigma."""
    torch.manual_seed(0)
    t = RandomStainJitter(0.02, (0.5, 2.0))
    params = [t.make_params([]) for _ in range(4000)]
    scales = torch.stack([p["scale"] for p in params])
    shifts = torch.stack([p["shift"] for p in params])
    assert float(scales.min()) >= 0.5 and float(scales.max()) <= 2.0
    assert float(scales.min()) < 0.52 and float(scales.max()) > 1.9  # the whole range is used
    assert abs(float((scales < 1).float().mean()) - 0.5) < 0.03  # log-uniform: median 1
    assert abs(float((scales < 2 ** -0.5).float().mean()) - 0.25) < 0.03
    assert float(shifts.abs().max()) <= 0.02


def test_stain_scale_darkens_real_nuclei_as_drawn(he_patch):
    """The drawn factor reaches the pixels: the haematoxylin scikit-image measures in nuclei
    after a pipeline run follows the factor the transform drew."""
    image, labels = he_patch
    cfg = AugmentConfig(flip=False, rotate90=False, scale=None, brightness=0, contrast=0, saturation=0, hue=0,
                        stain=0.0, stain_scale=(0.5, 3.0))
    apply = build_augmentation(cfg, 256)
    x = torch.from_numpy(image).permute(2, 0, 1).contiguous()
    nuclei = labels > 0
    before = rgb2hed(image)[..., 0][nuclei].mean()
    ratios = []
    for seed in range(6):
        torch.manual_seed(seed)
        drawn = RandomStainJitter(0.0, (0.5, 3.0)).make_params([])["scale"][0].item()
        torch.manual_seed(seed)
        out, _ = apply(x, torch.from_numpy(labels))
        after = rgb2hed(out.permute(1, 2, 0).numpy())[..., 0][nuclei].mean()
        ratios.append((drawn, after / before))
    for drawn, measured in ratios:
        assert measured == pytest.approx(drawn, rel=0.15), ratios


@pytest.mark.parametrize("value", ["[2, 3]", "[0.5]", "[0, 2]", "abc", "[0.5, 20]"])
def test_stain_scale_setting_is_checked(value):
    with pytest.raises(TrainConfigError, match="augment.stain_scale"):
        load_train_config(None, [f"augment.stain_scale={value}"])
