"""A runtime's batches are driven in numpy (flips, softmax, sigmoid, blend weights) so its process
needs no torch: the same probabilities as the torch path, with and without flip TTA, with a
distance channel kept or dropped, on a real network's logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_medseg.inference.backends import Backend
from napari_medseg.inference.forward import Batcher, forward_probabilities, numpy_probabilities
from napari_medseg.inference.run_report import RunReport
from napari_medseg.inference.settings import TileSettings
from napari_medseg.models import ModelConfig, build_model


@pytest.fixture(scope="module")
def network():
    """A tiny U-Net with a distance head (5 classes + 1 channel), weights fixed by seed."""
    torch.manual_seed(0)
    return build_model(ModelConfig("unet", "resnet18", num_classes=5, encoder_depth=3, distance_head=True)).eval()


def _numpy_run(network):
    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return network(torch.from_numpy(x)).numpy()
    return run


@pytest.mark.parametrize("tta", [False, True])
@pytest.mark.parametrize("channels", [None, 5, 6])
def test_numpy_probabilities_equal_torchs(network, tta, channels):
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    settings = TileSettings(64, 16, 2, tta=tta)
    with torch.inference_mode():
        expected = forward_probabilities(network, x, settings, torch.device("cpu"), 5, channels).numpy()
    got = numpy_probabilities(_numpy_run(network), x.numpy(), tta, 5, channels)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(got[:, :5].sum(1), 1.0, atol=1e-5)


def test_a_runtime_batcher_matches_the_torch_batcher(network):
    """The whole batch step (NHWC tiles in, weighted probabilities out), runtime against PyTorch."""
    tiles = np.random.default_rng(2).random((3, 64, 64, 3), dtype=np.float32)
    settings = TileSettings(64, 16, 2, tta=True)
    runtime = Backend("onnxruntime", None, numpy_run=_numpy_run(network))
    by_torch = Batcher(network, settings, torch.device("cpu"), RunReport(), 5, 6)(tiles)
    report = RunReport()
    by_runtime = Batcher(runtime, settings, torch.device("cpu"), report, 5, 6)(tiles)
    np.testing.assert_allclose(by_runtime, by_torch, atol=1e-5)
    assert report.forward_passes == 1 and report.batch_size == 2
