"""Model settings that cannot work are refused when the config is read, naming the setting:
UNet++ of encoder_depth 1 had built, then failed in its first training step with a traceback
(KeyError 'x_0_-1'); other depths out of range came after the data were read, in smp's words."""

from __future__ import annotations

import pytest

from napari_medseg.models import ModelConfig, ModelConfigError, build_model
from napari_medseg.training import TrainConfigError, load_train_config


@pytest.mark.parametrize("architecture, depth, allowed", [("unetplusplus", 1, "2 to 5"), ("fpn", 2, "3 to 5"),
                                                          ("unet", 6, "1 to 5"), ("unet", 0, "1 to 5")])
def test_an_encoder_depth_the_architecture_cannot_take_is_refused_with_the_config(tmp_path, architecture, depth,
                                                                                  allowed):
    with pytest.raises(TrainConfigError) as error:
        load_train_config(None, [f"model.architecture={architecture}", f"model.encoder_depth={depth}",
                                 "model.encoder=resnet18", f"data.dataset=[{tmp_path / 'not read yet'}]",
                                 "data.crop_size=64"])
    assert f"model.encoder_depth {depth} does not work with {architecture}: give {allowed}" in str(error.value)
    with pytest.raises(ModelConfigError, match=f"give {allowed}"):
        build_model(ModelConfig(architecture, "resnet18", num_classes=3, encoder_depth=depth))


def test_unetplusplus_of_depth_2_builds_and_runs():
    import torch

    model = build_model(ModelConfig("unetplusplus", "resnet18", num_classes=3, encoder_depth=2)).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 3, 64, 64)
