"""scripts/convert_tflite_mobilenet.py on the real ImageNet MobileNetV2 files in ../shared/weights:
the converted network must recognise real photographs, and its file must start a U-Net's encoder."""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = Path(os.environ.get("MEDSEG_WEIGHTS", REPO.parent / "shared" / "weights"))
FILES = {"tf1_uint8_per_tensor": "mobilenet_v2_1.0_224_quant.tflite",
         "tf2_int8_per_channel": "tf2_mobilenet_v2_1.0_224_ptq.tflite"}
# ImageNet-1k indices (the converter's top5 numbers a 1001-class model's classes the same way)
CATS = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
ESPRESSO, CUP, MUG = 967, 968, 504

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def converter():
    spec = importlib.util.spec_from_file_location("convert_tflite_mobilenet", REPO / "scripts" / "convert_tflite_mobilenet.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def tflite_file(key: str) -> Path:
    path = WEIGHTS / FILES[key]
    if not path.is_file():
        pytest.fail(f"Real weights missing: {path} (set MEDSEG_WEIGHTS to the folder holding them).")
    return path


@pytest.fixture(scope="module", params=list(FILES))
def network(request, converter):
    """The converted network with identity BatchNorm statistics: in eval mode the same function
    as the calibrated default (test_calibrated_batchnorm_keeps_the_function), and faster."""
    return converter.build_network(converter.read_convolutions(tflite_file(request.param)))


@pytest.fixture(scope="module")
def photographs(converter):
    return converter.photographs()  # RGB in [-1, 1], the TF models' input range


@pytest.mark.parametrize("padding", ["pytorch_symmetric", "tf_same"])
def test_converted_network_recognises_a_cat_and_an_espresso(converter, network, photographs, padding):
    net = converter.tf_same_padding(copy.deepcopy(network)) if padding == "tf_same" else network
    cat = [i for i, _ in converter.top5(net, photographs["chelsea"])]
    coffee = [i for i, _ in converter.top5(net, photographs["coffee"])]
    assert cat[0] in CATS and CATS <= set(cat), cat
    assert coffee[0] == ESPRESSO and {ESPRESSO, CUP, MUG} & set(coffee), coffee


def test_calibrated_batchnorm_keeps_the_function(converter, photographs):
    import torch
    import torch.nn.functional as F

    identity = converter.build_network(converter.read_convolutions(tflite_file("tf1_uint8_per_tensor")))
    calibrated = copy.deepcopy(identity)
    batch = F.interpolate(converter.calibration_batch()[::3], size=128, mode="bilinear", antialias=True)
    converter.calibrate_batchnorm(calibrated, batch)
    with torch.no_grad():
        chelsea = photographs["chelsea"]
        assert torch.allclose(calibrated.eval()(chelsea), identity.eval()(chelsea), atol=1e-3)
        # train mode (BatchNorm normalising by the batch's statistics) on the calibration batch: unchanged
        eval_features = calibrated.eval().features(batch)
        train_features = calibrated.train().features(batch)
        assert torch.allclose(train_features, eval_features, atol=1e-3)
        # identity statistics in train mode would instead answer the same for every image
        flat = identity.train().features(batch).mean(dim=(2, 3))
        assert torch.allclose(flat[0], flat[1], atol=1e-3)


def test_written_file_starts_a_unet_encoder(converter, photographs, tmp_path):
    import torch
    from napari_medseg.models import ModelConfig, build_model
    from napari_medseg.models.weights import read_state_dict

    out = tmp_path / "mobilenet_v2_imagenet.safetensors"
    assert converter.main([str(tflite_file("tf1_uint8_per_tensor")), "--out", str(out), "--batchnorm", "identity"]) == 0
    state = read_state_dict(out)
    assert state["classifier.1.weight"].shape == (1001, 1280)

    unet = build_model(ModelConfig(architecture="unet", encoder="mobilenet_v2", num_classes=3, encoder_weights=str(out)))
    encoder = unet.encoder.state_dict()
    assert set(encoder) <= set(state)  # every encoder tensor came from the file
    assert all(torch.equal(encoder[k], state[k]) for k in encoder)

    reference = converter.torchvision_mobilenet(num_classes=1001)
    reference.load_state_dict(state)  # strict: the file is a whole torchvision MobileNetV2
    with torch.no_grad():
        deepest = unet.encoder.eval()(photographs["chelsea"])[-1]
        assert torch.allclose(deepest, reference.eval().features(photographs["chelsea"]), atol=1e-5)
    assert converter.top5(reference, photographs["chelsea"])[0][0] in CATS
