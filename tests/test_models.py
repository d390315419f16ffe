"""Model registry and the safetensors checkpoint format (offline, tiny models)."""

from __future__ import annotations

import os

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch

from napari_medseg.models import (
    ARCHITECTURES, CheckpointError, CheckpointMeta, ModelConfig, ModelConfigError, build_model, load_checkpoint,
    read_meta, save_checkpoint,
)
from napari_medseg.models.checkpoint import METADATA_KEY

CLASSES = ["background", "other", "inflammatory", "epithelial", "spindle"]
REPORT_ENCODERS = ("resnet34", "resnet50", "vgg19", "densenet121", "mobilenet_v2", "efficientnet-b0")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(architecture: str = "unet", num_classes: int = 5, **kw) -> ModelConfig:
    kw = {"encoder": "resnet18", "encoder_depth": 3, "base_channels": 8, "depth": 3, **kw}
    return ModelConfig(architecture, num_classes=num_classes, **kw)


def tiny_model(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(cfg)
    # Non-trivial batch-norm buffers, so a round trip that dropped them would show.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.num_batches_tracked.fill_(7)
    return model.eval()


# --------------------------------------------------------------------------- architectures


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_architecture_maps_input_size_to_class_maps(architecture):
    cfg = tiny_config(architecture, num_classes=4)
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 4, 64, 64)
    assert torch.isfinite(out).all()
    # Any multiple of the declared output stride works, not only powers of two.
    s = cfg.output_stride
    with torch.no_grad():
        assert model(torch.randn(1, 3, 3 * s, 5 * s)).shape == (1, 4, 3 * s, 5 * s)


@pytest.mark.parametrize("depth", [3, 4, 5])
def test_fpn_output_matches_input_at_every_encoder_depth(depth):
    # smp's FPN upsamples by a fixed 4 unless told otherwise, which is right for depth 5 only.
    model = build_model(ModelConfig("fpn", "resnet18", num_classes=2, encoder_depth=depth)).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2, 64, 64)


def test_output_stride_ignores_architecture_case():
    assert ModelConfig("Vanilla_UNet", depth=5, encoder_depth=3).output_stride == 32
    assert ModelConfig("Attention_Res_UNet", depth=2).output_stride == 4


@pytest.mark.parametrize("encoder", REPORT_ENCODERS)
def test_report_encoders_build_offline_and_run(encoder):
    model = build_model(ModelConfig("unet", encoder, num_classes=3, encoder_depth=3)).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 3, 64, 64)
    assert torch.isfinite(out).all()


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(ModelConfigError, match=r"Unknown architecture 'segformer9000'.*unet.*vanilla_unet"):
        build_model(ModelConfig("segformer9000"))


def test_unknown_encoder_is_a_clear_error():
    with pytest.raises(ModelConfigError, match=r"Unknown encoder 'resnet9000'.*resnet34"):
        build_model(ModelConfig("unet", "resnet9000"))


def test_unknown_config_key_and_bad_class_count():
    with pytest.raises(ModelConfigError, match="Unknown model setting.*colour_depth"):
        ModelConfig.from_dict({"architecture": "unet", "colour_depth": 3})
    with pytest.raises(ModelConfigError, match="num_classes"):
        build_model(tiny_config(num_classes=0))


def test_missing_local_encoder_weights_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere" / "encoder.safetensors"
    with pytest.raises(ModelConfigError, match=r"local file.*no downloads.*does not exist") as info:
        build_model(tiny_config(encoder_weights=str(missing)))
    assert str(missing) in str(info.value)


def test_local_encoder_weights_are_loaded(tmp_path):
    from safetensors.torch import save_file

    source = tiny_model(tiny_config(), seed=1)
    file = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in source.encoder.state_dict().items()}, str(file))
    model = build_model(tiny_config(encoder_weights=str(file)))
    for key, value in source.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[key], value), key

    # Extra tensors (an ImageNet classifier head, deeper stages) are ignored.
    full = tmp_path / "with_head.safetensors"
    extra = {"fc.weight": torch.zeros(1000, 512), "layer4.0.conv1.weight": torch.zeros(512, 256, 3, 3)}
    save_file({**{k: v.contiguous() for k, v in source.encoder.state_dict().items()}, **extra}, str(full))
    model = build_model(tiny_config(encoder_weights=str(full)))
    assert torch.equal(model.encoder.conv1.weight, source.encoder.conv1.weight)

    unrelated = tmp_path / "unrelated.safetensors"
    save_file({"not.an.encoder.weight": torch.zeros(3)}, str(unrelated))
    with pytest.raises(ModelConfigError, match="none of its tensors match"):
        build_model(tiny_config(encoder_weights=str(unrelated)))

    wrong = tmp_path / "wrong_shape.safetensors"
    save_file({"conv1.weight": torch.zeros(64, 3, 3, 3)}, str(wrong))
    with pytest.raises(ModelConfigError, match=r"wrong shape.*conv1.weight.*another encoder"):
        build_model(tiny_config(encoder_weights=str(wrong)))


# --------------------------------------------------------------------------- checkpoints


def full_meta(cfg: ModelConfig) -> CheckpointMeta:
    return CheckpointMeta(
        model=cfg, classes=list(CLASSES),
        colors=[[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]],
        normalization={"mean": [0.7, 0.5, 0.6], "std": [0.15, 0.2, 0.1]},
        pixel_size_um=0.25,
        training={"epochs": 3, "lr": 1e-3, "loss": "dice+ce", "split": {"train": ["train_1"], "val": ["train_2"]}},
        data={"dataset": "consep_train"}, metrics={"miou": 0.5},
        model_card="Tiny test model, not for use.",
    )


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, exact: bool = True) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        if exact:
            assert torch.equal(sa[key], sb[key]), key
        else:
            torch.testing.assert_close(sa[key], sb[key], rtol=1e-3, atol=1e-4, msg=key)


@pytest.mark.parametrize("architecture", ["unet", "attention_res_unet"])
def test_fp32_round_trip_is_exact_and_keeps_metadata(tmp_path, architecture):
    cfg = tiny_config(architecture)
    model = tiny_model(cfg)
    meta = full_meta(cfg)
    umask = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "m.safetensors", model, meta)
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644  # shareable like any file, not safetensors' 0600
    loaded, meta2 = load_checkpoint(path)
    assert not loaded.training
    assert_same_weights(model, loaded)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))

    for m in (meta2, read_meta(path)):
        assert m.model == cfg
        assert m.classes == CLASSES
        assert m.colors == [[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]]
        assert m.normalization == {"mean": [0.7, 0.5, 0.6], "std": [0.15, 0.2, 0.1]}
        assert m.pixel_size_um == 0.25
        assert m.training == meta.training
        assert m.data == {"dataset": "consep_train"} and m.metrics == {"miou": 0.5}
        assert m.model_card == "Tiny test model, not for use."
        assert m.versions.get("torch") and m.created


def test_fp16_round_trip_is_close_and_half_the_size(tmp_path):
    cfg = tiny_config()
    model = tiny_model(cfg)
    full = save_checkpoint(tmp_path / "full.safetensors", model, full_meta(cfg))
    half = save_checkpoint(tmp_path / "half.safetensors", model, full_meta(cfg), half=True)
    ratio = half.stat().st_size / full.stat().st_size
    assert 0.45 < ratio < 0.55, ratio
    loaded, meta = load_checkpoint(half)
    assert meta.classes == CLASSES
    assert_same_weights(model, loaded, exact=False)  # dtypes are back to the model's (fp32, int64)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-2, atol=1e-2)


def test_any_header_length_loads(tmp_path):
    # The first byte of a safetensors file is the low byte of its header length; when that
    # is 0x80 (a pickle opcode) the file must still be recognised as safetensors.
    cfg = tiny_config("vanilla_unet", num_classes=2, base_channels=2, depth=1)
    model = tiny_model(cfg)
    first_bytes = set()
    for n in range(0, 300, 4):
        path = save_checkpoint(tmp_path / f"m{n}.safetensors", model,
                               CheckpointMeta(model=cfg, classes=["bg", "fg"], model_card="x" * n))
        first_bytes.add(path.read_bytes()[0])
        load_checkpoint(path)
    assert 0x80 in first_bytes


class CreateMarker:
    """Unpickling this creates ``path``: a harmless stand-in for arbitrary code execution."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_payload_would_run_if_unpickled(tmp_path):
    # Guards the test below: the payload is live, so "no marker" really means "not unpickled".
    marker = tmp_path / "pwned_sanity"
    pickle.loads(pickle.dumps(CreateMarker(marker))).close()
    assert marker.exists()


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_malicious_pickle_is_refused_and_never_unpickled(tmp_path, zipfile):
    marker = tmp_path / "pwned"
    model = tiny_model(tiny_config())
    path = tmp_path / "evil.safetensors"  # the suffix lies; the content decides
    torch.save({"state_dict": model.state_dict(), "meta": CreateMarker(marker)}, path,
               _use_new_zipfile_serialization=zipfile)
    for load in (read_meta, load_checkpoint):
        with pytest.raises(CheckpointError, match="pickle") as info:
            load(path)
        assert "unpickl" in str(info.value) and "save_checkpoint" in str(info.value)
    assert not marker.exists()

    from napari_medseg.inference import Segmenter

    with pytest.raises(CheckpointError, match="pickle"):
        Segmenter.load(path, device="cpu")
    assert not marker.exists()


def test_bare_safetensors_without_metadata_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model(tiny_config()).state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match="no napari-medseg metadata"):
        load_checkpoint(path)
    save_file({"w": torch.zeros(2)}, str(path), metadata={METADATA_KEY: json.dumps({"format": "other-tool"})})
    with pytest.raises(CheckpointError, match="not a napari-medseg checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize("keep", [0, 5, 20, "half_header", "most"])
def test_truncated_checkpoint_is_refused(tmp_path, keep):
    cfg = tiny_config()
    good = save_checkpoint(tmp_path / "good.safetensors", tiny_model(cfg), full_meta(cfg))
    data = good.read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    n = {"half_header": 8 + header_len // 2, "most": len(data) - 100}.get(keep, keep)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[:n])
    with pytest.raises(CheckpointError, match="(?i)truncated|too short|not a safetensors"):
        load_checkpoint(bad)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_weights_for_another_class_count_are_refused(tmp_path):
    three = tiny_model(tiny_config(num_classes=3))
    meta = CheckpointMeta(model=tiny_config(num_classes=5), classes=list(CLASSES))  # says 5 classes
    path = save_checkpoint(tmp_path / "mismatch.safetensors", three, meta)
    with pytest.raises(CheckpointError, match=r"5 classes.*another class count") as info:
        load_checkpoint(path)
    assert "(3," in str(info.value) and "(5," in str(info.value)


def test_class_names_must_match_num_classes(tmp_path):
    cfg = tiny_config(num_classes=3)
    meta = CheckpointMeta(model=cfg, classes=["background", "nucleus"])  # 2 names, 3 outputs
    path = save_checkpoint(tmp_path / "names.safetensors", tiny_model(cfg), meta)
    with pytest.raises(CheckpointError, match="2 class names but the model has 3 outputs"):
        read_meta(path)
    with pytest.raises(CheckpointError, match="2 class names"):
        load_checkpoint(path)


def test_unknown_metadata_field_and_bad_json_are_refused(tmp_path):
    from safetensors.torch import save_file

    cfg = tiny_config()
    data = json.loads(full_meta(cfg).to_json())
    data["model"]["flavour"] = "spicy"
    path = tmp_path / "odd.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={METADATA_KEY: json.dumps(data)})
    with pytest.raises(CheckpointError, match="flavour"):
        read_meta(path)
    save_file({"w": torch.zeros(1)}, str(path), metadata={METADATA_KEY: "{not json"})
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_meta(path)


def test_loading_does_not_need_the_encoder_init_file(tmp_path):
    from safetensors.torch import save_file

    init = tmp_path / "init.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model(tiny_config(), seed=3).encoder.state_dict().items()}, str(init))
    cfg = tiny_config(encoder_weights=str(init))
    model = tiny_model(cfg)
    path = save_checkpoint(tmp_path / "m.safetensors", model, CheckpointMeta(model=cfg, classes=list(CLASSES)))
    init.unlink()  # e.g. the checkpoint was copied to another machine
    loaded, meta = load_checkpoint(path)
    assert meta.model.encoder_weights == str(init)  # recorded, as provenance
    assert_same_weights(model, loaded)


def test_load_never_calls_torch_load(tmp_path, monkeypatch):
    cfg = tiny_config()
    model = tiny_model(cfg)
    path = save_checkpoint(tmp_path / "m.safetensors", model, full_meta(cfg))

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(torch.serialization, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    loaded, _ = load_checkpoint(path)
    assert_same_weights(model, loaded)


# --------------------------------------------------------------------------- inference rewrites


@pytest.mark.parametrize("architecture,encoder", [(a, "resnet18") for a in ARCHITECTURES] + [("unet", "mobilenet_v2")])
def test_folded_and_fused_model_gives_the_same_outputs(architecture, encoder):
    from napari_medseg.models.optimise import ConvActivation, _onednn_fusion_available, optimise_for_inference

    model = tiny_model(tiny_config(architecture, num_classes=4, encoder=encoder))
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    fast = optimise_for_inference(model, check_input=None)  # unchecked: the rewrite itself is on trial
    def count(net, kind):
        return sum(isinstance(m, kind) for m in net.modules())

    # DeepLabV3+'s separable convs are containers, so the batch norm after them stays
    assert count(fast, torch.nn.BatchNorm2d) < count(model, torch.nn.BatchNorm2d)
    if _onednn_fusion_available() and architecture != "fpn":  # FPN's heads use GroupNorm between conv and ReLU
        assert any(isinstance(m, ConvActivation) for m in fast.modules())
    with torch.inference_mode():
        expected, got = model(x), fast(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # the rewrite works on a copy: the original keeps its layers
    assert not any(isinstance(m, ConvActivation) for m in model.modules())
