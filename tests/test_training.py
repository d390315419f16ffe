"""The headless trainer on real CoNSeP patches with tiny models."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from napari_medseg.models import load_checkpoint, read_meta
from napari_medseg.training import EpochDone, TrainConfig, TrainConfigError, TrainingError, load_train_config, train
from napari_medseg.training.data import load_dataset_folders, split_by_group
from napari_medseg.training.losses import class_weights_from_frequencies

TINY = ["model.architecture=unet", "model.encoder=resnet18", "model.encoder_depth=3", "data.crop_size=64",
        "batch_size=4", "lr=0.003"]


def tiny_config(dataset, out_dir, *extra) -> TrainConfig:
    return load_train_config(None, [*TINY, f"data.dataset=[{dataset}]", f"out_dir={out_dir}", *extra])


def test_train_two_epochs_writes_a_loadable_best_checkpoint(small_consep, tmp_path):
    cfg = tiny_config(small_consep, tmp_path / "run", "epochs=2", "data.val_fraction=0.34")
    updates = []
    result = train(cfg, on_update=updates.append)
    epochs = [u for u in updates if isinstance(u, EpochDone)]
    assert [e.epoch for e in epochs] == [1, 2]
    assert all(np.isfinite(e.train_loss) and np.isfinite(e.val_loss) for e in epochs)
    assert 0.0 <= epochs[-1].metrics["nucleus_dice"] <= 1.0
    assert result.checkpoint.is_file() and result.best_epoch in (1, 2)
    model, meta = load_checkpoint(result.checkpoint)
    assert meta.classes == ["background", "other", "inflammatory", "epithelial", "spindle"]
    assert meta.training["config"]["model"]["encoder"] == "resnet18"
    assert len(meta.training["history"]) == result.best_epoch
    assert meta.data["val_images"] == 2 and meta.data["train_images"] == 4  # split by source image
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 5, 64, 64)
    assert not list((tmp_path / "run").glob("*.part"))


def test_split_keeps_patches_of_one_image_together(consep):
    items, classes = load_dataset_folders([str(consep)], r"^(.*)_\d+$")
    train_items, val_items = split_by_group(items, 0.15, seed=0)
    train_groups = {it.group for it in train_items}
    val_groups = {it.group for it in val_items}
    assert not train_groups & val_groups
    assert len(val_groups) == 4 and len(val_items) == 64 and len(train_items) == 368
    # seeded: the same split again
    assert [it.name for it in split_by_group(items, 0.15, seed=0)[1]] == [it.name for it in val_items]


def test_class_weights_from_real_frequencies(consep):
    from napari_medseg.training.data import pixel_frequencies

    items, classes = load_dataset_folders([str(consep)], r"^(.*)_\d+$")
    freq = pixel_frequencies(items, len(classes))
    # CoNSeP's pixel shares, computed independently of the trainer's helpers
    counts = np.zeros(5)
    for it in items:
        counts += np.bincount(it.labels.ravel(), minlength=5)
    np.testing.assert_allclose(freq, counts / counts.sum())
    assert 0.0015 < freq[1] < 0.0020  # 'other' is 0.2 % of pixels (data README)
    w = class_weights_from_frequencies(freq)  # auto = median-frequency balancing
    np.testing.assert_allclose(w * freq, freq[4])  # spindle holds the median share: weight 1
    assert w[4] == pytest.approx(1.0)
    np.testing.assert_allclose(w, [0.0588, 27.58, 1.837, 0.570, 1.0], rtol=2e-3)
    assert np.argmax(w) == 1  # 'other', the rarest class, weighs most
    inverse = class_weights_from_frequencies(freq, "inverse")
    assert inverse[0] == 1.0
    np.testing.assert_allclose(inverse * freq, freq[0])
    assert inverse[1] == pytest.approx(469.2, rel=1e-3)
    # a class absent from the training data cannot be learned: weight 0
    assert class_weights_from_frequencies(np.array([0.9, 0.1, 0.0]))[2] == 0.0


def test_stop_request_ends_training_and_keeps_no_partial_checkpoint(small_consep, tmp_path):
    cfg = tiny_config(small_consep, tmp_path / "run", "epochs=5")
    result = train(cfg, should_stop=lambda: True)
    assert result.stopped_early and result.reason == "stopped by user"
    assert result.checkpoint is None
    assert not list((tmp_path / "run").glob("*"))


def test_nan_loss_stops_with_clear_message_and_keeps_best(small_consep, tmp_path, monkeypatch):
    import napari_medseg.training.trainer as trainer_module

    cfg = tiny_config(small_consep, tmp_path / "run", "epochs=3")
    real_build_loss = trainer_module.build_loss
    calls = {"n": 0}

    def exploding_loss(name, weights=None, **kwargs):
        inner = real_build_loss(name, weights, **kwargs)

        def loss(logits, target):
            calls["n"] += 1
            value = inner(logits, target)
            return value * float("nan") if calls["n"] > 3 else value  # epoch 1 (2 train + val) is fine

        return loss

    monkeypatch.setattr(trainer_module, "build_loss", exploding_loss)
    with pytest.raises(TrainingError, match="loss became nan"):
        train(cfg)
    best = tmp_path / "run" / "best.safetensors"
    assert best.is_file()
    assert read_meta(best).training["best_epoch"] == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_read_only_output_dir_fails_before_training(small_consep, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(TrainingError, match="Cannot write checkpoints"):
        train(tiny_config(small_consep, ro / "run"))


def test_unwritable_output_path_fails_before_training(small_consep, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(TrainingError, match="Cannot write checkpoints"):
        train(tiny_config(small_consep, blocker / "run"))


def test_bad_configs_are_refused_clearly(tmp_path, small_consep):
    with pytest.raises(TrainConfigError, match="Unknown training setting"):
        load_train_config(None, ["epoch=3"])
    with pytest.raises(TrainConfigError, match="Unknown model setting"):
        load_train_config(None, ["model.encodr=resnet18"])
    with pytest.raises(TrainConfigError, match="key=value"):
        load_train_config(None, ["epochs"])
    with pytest.raises(TrainConfigError, match="does not exist"):
        load_train_config(tmp_path / "missing.yaml")
    cfg = tiny_config(small_consep, tmp_path / "run", "loss=weighted_ce", "class_weights=[1, 2]")
    with pytest.raises(TrainConfigError, match="2 values for 5 classes"):
        train(cfg)


def test_empty_and_broken_datasets_are_refused_before_training(tmp_path, small_consep):
    from napari_medseg.io.dataset import DatasetError

    (small_consep / "labels" / "train_1_005.tif").unlink()
    with pytest.raises(DatasetError, match="lacks masks"):
        train(tiny_config(small_consep, tmp_path / "run"))
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "classes.json").write_text('{"classes": ["background", "nucleus"]}')
    with pytest.raises(DatasetError, match="holds no images"):
        train(tiny_config(empty, tmp_path / "run2"))
    assert not (tmp_path / "run" / "best.safetensors").exists()


def test_shipped_configs_parse():
    from pathlib import Path

    from napari_medseg.training.stages import load_train_stages

    for path in sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")):
        for stage in load_train_stages(path):
            assert stage.config.data.dataset or stage.config.data.datasets, path
            stage.config.for_device("cuda")  # its GPU settings are valid too


def test_continuing_the_shipped_default_needs_no_imagenet_file(tmp_path, monkeypatch):
    """The shipped default records the ImageNet file its first stage started from; a run that
    starts from the default itself (configs/all_data.yaml) replaces every weight, so a clone
    without that file (runs/ is not in git) must still build the network."""
    from pathlib import Path

    from napari_medseg.training.network import build_training_model
    from napari_medseg.training.setup import load_start_checkpoint
    from napari_medseg.training.stages import load_train_stages

    first = load_train_stages(Path(__file__).parents[1] / "configs" / "all_data.yaml")[0].config
    first.init_checkpoint = str(Path(first.init_checkpoint).resolve())
    monkeypatch.chdir(tmp_path)  # the recorded ImageNet path is relative: nothing is there
    start = load_start_checkpoint(first)
    assert first.model.encoder_weights is None
    model = build_training_model(first, start.weights)
    assert torch.equal(model.state_dict()["segmentation_head.0.weight"], start.weights["segmentation_head.0.weight"])


def test_all_data_config_trains_every_set_and_takes_gpu_settings_on_a_gpu():
    from pathlib import Path

    from napari_medseg.training.stages import load_train_stages

    first, second = (s.config for s in load_train_stages(Path(__file__).parents[1] / "configs" / "all_data.yaml"))
    assert [(Path(d.path).name, d.labels) for d in first.data.datasets] == [
        ("consep_train", "classes"), ("monuseg_train", "binary"), ("tnbc_train", "binary")]
    assert Path(first.init_checkpoint).is_file()  # the shipped weights, from the repository root
    assert second.init_checkpoint == "runs/all_data/mixed/best.safetensors"
    assert first.model.distance_head and first.model.encoder == "mobilenet_v2" and first.amp == "auto"
    # each stage keeps the epoch that gives up least against the model it starts from
    assert first.monitor == second.monitor == "val_least_gain_over_start"
    on_cpu, on_gpu = first.for_device("cpu"), first.for_device("cuda")
    assert on_cpu is first and (on_cpu.batch_size, on_cpu.data.crop_size, on_cpu.num_threads) == (16, 256, 2)
    # the default's own last recipe, on its own split: TNBC 2 : 1 : 2, the distance loss x3, x5 where nuclei touch
    assert [d.weight for d in first.data.datasets] == [2.0, 1.0, 2.0] and first.data.split_seed == 0
    assert (first.distance_loss_weight, first.distance_touch_weight, first.ema_decay) == (3.0, 5.0, 0.995)
    assert (on_gpu.batch_size, on_gpu.data.crop_size, on_gpu.data.num_workers, on_gpu.num_threads) == (64, 256, 8, 0)
    assert on_gpu.data.datasets == first.data.datasets and on_gpu.augment == first.augment  # sections merge key by key
    assert on_gpu.on_cuda == {}


def test_gpu_settings_are_checked_when_the_config_is_read():
    with pytest.raises(TrainConfigError, match="on_cuda: Unknown training setting"):
        TrainConfig.from_dict({"on_cuda": {"batchsize": 64}})
    with pytest.raises(TrainConfigError, match="on_cuda: batch_size must be an integer"):
        TrainConfig.from_dict({"on_cuda": {"batch_size": "big"}})
    with pytest.raises(TrainConfigError, match="tune_threshold must be true, false or auto"):
        TrainConfig.from_dict({"tune_threshold": "sometimes"})


@pytest.mark.parametrize("amx", [True, False])
def test_amp_auto_is_bf16_on_a_cpu_with_amx_and_off_on_others(amx, small_consep, tmp_path, monkeypatch):
    """bf16 autocast is measured faster only where the CPU has AMX (1.4-1.75x a step of the
    default); CPUs without it emulate bf16 (7x slower on an AVX2 EPYC). on / off are obeyed."""
    from napari_medseg.training import network

    monkeypatch.setattr(network, "cpu_has_bf16_matrix_units", lambda: amx)
    cpu = torch.device("cpu")
    for amp, expected in (("auto", amx), ("off", False), ("on", True)):
        cfg = tiny_config(small_consep, tmp_path / "run", f"amp='{amp}'")
        precision = network.Precision.for_device(cfg, cpu)
        assert precision.amp is expected and precision.grad_scaler() is None  # bf16 needs no loss scaling
    assert network.Precision.for_device(cfg, cpu).autocast().fast_dtype == torch.bfloat16


def test_bf16_autocast_trains_on_the_cpu(small_consep, tmp_path):
    """``amp: on`` on a CPU: a real run in bf16 autocast, finite losses, float32 weights saved."""
    cfg = tiny_config(small_consep, tmp_path / "run", "epochs=1", "data.val_fraction=0.34", "amp='on'")
    updates = []
    result = train(cfg, on_update=updates.append)
    (epoch,) = [u for u in updates if isinstance(u, EpochDone)]
    assert np.isfinite(epoch.train_loss) and np.isfinite(epoch.val_loss)
    model, _ = load_checkpoint(result.checkpoint)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
