"""A fine-tuned model averaged with its start: the weights interpolated, batch norm re-measured on
training crops, the threshold re-tuned; on real CoNSeP patches with tiny models."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from napari_medseg.models import ModelConfig, build_model, load_checkpoint, read_meta, save_checkpoint
from napari_medseg.training import train
from napari_medseg.training.average import AverageError, average_checkpoints, interpolate, recompute_batchnorm

from test_training import tiny_config

TINY_MODEL = ModelConfig("unet", "resnet18", num_classes=5, encoder_depth=3)


def _tiny(seed: int):
    torch.manual_seed(seed)
    return build_model(TINY_MODEL).eval()


def test_interpolate_mixes_float_tensors_and_keeps_counters():
    start, tuned = _tiny(0).state_dict(), _tiny(1).state_dict()
    name = next(k for k, v in start.items() if v.is_floating_point() and v.ndim == 4)
    for weight in (0.0, 0.3, 1.0):
        mixed = interpolate(start, tuned, weight)
        torch.testing.assert_close(mixed[name], (1 - weight) * start[name] + weight * tuned[name])
    counter = next(k for k in start if k.endswith("num_batches_tracked"))
    assert mixed[counter].dtype == torch.int64 and torch.equal(mixed[counter], tuned[counter])
    other = build_model(ModelConfig("unet", "resnet18", num_classes=5, encoder_depth=4)).state_dict()
    with pytest.raises(AverageError, match="different layers"):
        interpolate(start, other, 0.5)


def test_batchnorm_is_measured_again_as_a_plain_average_over_the_batches():
    model = _tiny(0)
    first = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    momentum = first.momentum
    seen_inputs = []
    hook = first.register_forward_hook(lambda m, args, out: seen_inputs.append(args[0].detach().clone()))
    torch.manual_seed(2)
    batches = [(torch.rand(3, 3, 64, 64) * (i + 1),) for i in range(4)]  # batches unlike each other
    assert recompute_batchnorm(model, batches, torch.device("cpu")) == 12
    hook.remove()
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x in seen_inputs])
    variances = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in seen_inputs])
    torch.testing.assert_close(first.running_mean, means.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first.running_var, variances.mean(0), rtol=1e-4, atol=1e-5)
    assert not model.training and first.momentum == momentum


def test_average_of_a_start_and_its_fine_tuning_on_real_patches(small_consep, tmp_path):
    start_cfg = tiny_config(small_consep, tmp_path / "start", "epochs=1", "data.val_fraction=0.34")
    start = train(start_cfg).checkpoint
    tuned_cfg = tiny_config(small_consep, tmp_path / "tuned", "epochs=1", "data.val_fraction=0.34",
                            f"init_checkpoint={start}", "lr=0.01")
    tuned = train(tuned_cfg).checkpoint
    out = tmp_path / "averaged.safetensors"
    cfg = tiny_config(small_consep, tmp_path / "unused", "data.val_fraction=0.34")
    done = average_checkpoints(start, tuned, 0.25, out, cfg, batchnorm="measure", threshold="tune", crops=16)
    assert done.path == out and out.is_file() and done.bn_crops == 16 and done.tuning is not None
    assert not list(tmp_path.glob(".averaged*"))  # written under a temp name, renamed when complete
    meta = read_meta(out)
    assert meta.training["averaged"]["weight_on_tuned"] == 0.25 and meta.training["averaged"]["batchnorm_crops"] == 16
    assert meta.foreground_threshold is not None and 0.0 < meta.foreground_threshold < 1.0
    assert meta.data["val_groups"] == read_meta(tuned).data["val_groups"]
    averaged, _ = load_checkpoint(out)
    a, b = load_checkpoint(start)[0].state_dict(), load_checkpoint(tuned)[0].state_dict()
    got = averaged.state_dict()
    conv = next(k for k, v in a.items() if v.is_floating_point() and v.ndim == 4)
    torch.testing.assert_close(got[conv], 0.75 * a[conv] + 0.25 * b[conv], rtol=2e-3, atol=2e-3)  # saved as fp16
    norm = next(k for k in a if k.endswith("running_var"))
    assert not torch.allclose(got[norm], 0.75 * a[norm] + 0.25 * b[norm], rtol=1e-2)  # measured, not mixed

    with pytest.raises(AverageError, match="exists"):
        average_checkpoints(start, tuned, 0.25, out, cfg, batchnorm="measure", crops=16)
    # a config that holds out other source images than the fine-tuning did is refused
    splits = (tiny_config(small_consep, tmp_path / "unused", "data.val_fraction=0.34", f"seed={seed}")
              for seed in range(1, 20))
    other_split = next(c for c in splits if _val_groups(c) != meta.data["val_groups"])
    with pytest.raises(AverageError, match="validation images"):
        average_checkpoints(start, tuned, 0.25, tmp_path / "other.safetensors", other_split, threshold="tune")
    with pytest.raises(AverageError, match="between 0 and 1"):
        average_checkpoints(start, tuned, 1.5, tmp_path / "x.safetensors")
    with pytest.raises(AverageError, match="needs the fine-tuning's config"):
        average_checkpoints(start, tuned, 0.5, tmp_path / "x.safetensors", batchnorm="measure")
    with pytest.raises(AverageError, match="a number"):
        average_checkpoints(start, tuned, 0.5, tmp_path / "x.safetensors", threshold="high")
    assert not (tmp_path / "x.safetensors").exists()

    # the defaults need no data: batch norm averaged like the weights, the fine-tuned model's threshold
    plain = average_checkpoints(start, tuned, 0.25, tmp_path / "plain.safetensors")
    got = load_checkpoint(plain.path)[0].state_dict()
    torch.testing.assert_close(got[norm], 0.75 * a[norm] + 0.25 * b[norm], rtol=2e-3, atol=2e-3)
    assert plain.bn_crops == 0 and read_meta(plain.path).foreground_threshold == read_meta(tuned).foreground_threshold
    fixed = average_checkpoints(start, tuned, 0.25, tmp_path / "fixed.safetensors", threshold="0.4")
    assert read_meta(fixed.path).foreground_threshold == 0.4

    # a start that records the ImageNet file its own run began from (as the shipped default does)
    # is the same network as its fine-tuning, which records none
    start_model, start_meta = load_checkpoint(start)
    start_meta.model = dataclasses.replace(start_meta.model, encoder_weights="runs/imagenet/encoder.safetensors")
    imagenet_start = save_checkpoint(tmp_path / "imagenet_start.safetensors", start_model, start_meta)
    assert read_meta(tuned).model.encoder_weights is None
    assert average_checkpoints(imagenet_start, tuned, 0.5, tmp_path / "mixed.safetensors").path.is_file()


def _val_groups(cfg) -> list[str]:
    from napari_medseg.training.setup import prepare_data

    return sorted({it.group for it in prepare_data(cfg, None, None).val_items})


def test_medseg_average_as_installed(small_consep, tmp_path):
    """The command a user runs: two checkpoints of one network with other classes are refused; a
    model and a copy of itself average to a checkpoint with the threshold asked for (the same file
    twice is refused: test_a_model_averaged_with_itself_is_refused)."""
    import shutil

    start_cfg = tiny_config(small_consep, tmp_path / "start", "epochs=1", "data.val_fraction=0.34")
    start = train(start_cfg).checkpoint
    binary = tiny_config(small_consep, tmp_path / "binary", "epochs=1", "data.val_fraction=0.34", "data.binary=true")
    other = train(binary).checkpoint
    done = subprocess.run([sys.executable, "-m", "napari_medseg", "average", str(start), str(other), "--weight", "0.5",
                           "--out", str(tmp_path / "o.safetensors")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "different networks" in done.stderr, done.stderr
    assert not (tmp_path / "o.safetensors").exists()
    copy = shutil.copy(start, tmp_path / "copy.safetensors")
    done = subprocess.run([sys.executable, "-m", "napari_medseg", "average", str(start), str(copy), "--weight", "0.5",
                           "--threshold", "0.45", "--out", str(tmp_path / "o.safetensors")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "batch norm averaged with the weights; foreground threshold 0.45" in done.stdout
    assert f"wrote {tmp_path / 'o.safetensors'}" in done.stdout
    assert read_meta(tmp_path / "o.safetensors").foreground_threshold == 0.45
    # the record names the models as the user did: 'default', not where it is installed here
    from napari_medseg.models import resolve_model_path

    default_copy = shutil.copy(resolve_model_path("default"), tmp_path / "default_copy.safetensors")
    done = subprocess.run([sys.executable, "-m", "napari_medseg", "average", "default", str(default_copy), "--weight",
                           "0.5", "--out", str(tmp_path / "d.safetensors")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    averaged = read_meta(tmp_path / "d.safetensors").training["averaged"]
    assert (averaged["start"], averaged["tuned"]) == ("default", str(default_copy))



def test_a_model_averaged_with_itself_is_refused(tmp_path):
    """'medseg average default default --weight 0.5' had written a copy of the default without a word."""
    from hostile import medseg

    proc = medseg("average", "default", "default", "--weight", "0.5", "--out", tmp_path / "same.safetensors")
    assert proc.returncode == 2 and "is both models" in proc.stderr, proc.stderr
    assert not (tmp_path / "same.safetensors").exists()
