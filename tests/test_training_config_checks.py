"""Settings a training run would have taken and then ignored or misused (a walkthrough that ran
every shipped config): each is refused before the data are read, naming what to do, or, where
it is a choice, said before the first epoch."""

from __future__ import annotations

from pathlib import Path

import pytest

from napari_medseg.models.config import ModelConfig, ModelConfigError
from napari_medseg.training.config import TrainConfig, TrainConfigError
from napari_medseg.training.stages import load_train_stages

REPO = Path(__file__).resolve().parents[1]
TINY = ["epochs=1", "batch_size=4", "data.crop_size=64", "data.samples_per_epoch=16"]


def _config(model: dict | None = None, **settings) -> TrainConfig:
    return TrainConfig.from_dict({"model": {"num_classes": 2, **(model or {})},
                                  "data": {"dataset": str(REPO / "tests")}, **settings})


def test_set_wins_over_on_cuda_on_every_device():
    """`--set epochs=1 ...` on the shipped config had become 40 epochs of 256² crops, batch 64,
    4096 crops an epoch on a GPU (the config's on_cuda), said of the epochs only."""
    for stage in load_train_stages(REPO / "configs" / "default.yaml", TINY):
        on_gpu = stage.config.for_device("cuda")
        assert (on_gpu.epochs, on_gpu.batch_size, on_gpu.data.crop_size, on_gpu.data.samples_per_epoch) == (1, 4, 64, 16)
    first = load_train_stages(REPO / "configs" / "default.yaml", TINY)[0].config
    # what --set did not name still follows on_cuda (the first stage's lr 0.002 is 0.001 on a GPU)
    assert first.for_device("cuda").num_threads == 0 and first.for_device("cuda").lr == 0.001
    assert load_train_stages(REPO / "configs" / "default.yaml", ["on_cuda.epochs=3"])[0].config.for_device("cuda").epochs == 3


@pytest.mark.parametrize("model, says", [
    ({"architecture": "unet", "encoder": "resnet18", "dropout": 0.5}, "model.dropout applies to vanilla_unet"),
    ({"architecture": "deeplabv3plus", "encoder": "resnet18", "base_channels": 64}, "model.base_channels applies to"),
    ({"architecture": "deeplabv3plus", "encoder": "resnet18", "decoder_channels": [64, 32]},
     "model.decoder_channels applies to the U-Net family"),
    ({"architecture": "vanilla_unet", "encoder_weights": "/nonexistent.safetensors"},
     "model.encoder_weights: vanilla_unet has no encoder weights"),
    ({"architecture": "attention_res_unet", "extra": {"decoder_attention_type": "scse"}},
     "model.extra: attention_res_unet has no smp keyword arguments"),
    ({"architecture": "vanilla_unet", "dropout": 1.5}, r"model.dropout must lie in \[0, 1\)"),
])
def test_model_settings_the_architecture_would_ignore_are_refused(model, says):
    with pytest.raises(TrainConfigError, match=says):
        _config(model)


def test_the_shipped_configs_still_pass():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        assert load_train_stages(path, []), path


def test_a_misspelt_smp_keyword_is_refused_when_the_network_is_built():
    from napari_medseg.models.registry import build_model

    with pytest.raises(ModelConfigError, match="Unet has no 'decoder_atention_type'; its settings are .*decoder_attention_type"):
        build_model(ModelConfig(encoder="resnet18", encoder_depth=3, extra={"decoder_atention_type": "scse"}))
    build_model(ModelConfig(encoder="resnet18", encoder_depth=3, extra={"decoder_attention_type": "scse"}))


@pytest.mark.parametrize("settings, says", [
    ({"data": {"dataset": "x", "crop_size": 0}}, "data.crop_size must be an integer of at least 1"),
    ({"monitor": "loss"}, "did you mean 'val_loss'"),
    ({"min_delta": -1}, "min_delta must be at least 0"),
    ({"quadratic_stop": {"enabled": True, "patience": -1}}, "quadratic_stop.patience must be at least 0"),
    ({"oversample": {"factor": -1}}, "oversample.factor must be at least 0"),
    ({"oversample": {"factor": 1, "min_share": 5.0}}, "oversample.min_share is a share of pixels"),
    ({"oversample": {"classes": [1]}}, "only with oversample.factor of at least 1"),
])
def test_values_that_would_do_nothing_or_fail_late_are_refused(settings, says):
    data = {"model": {"num_classes": 2}, "data": {"dataset": "x"}, **settings}
    with pytest.raises(TrainConfigError, match=says):
        TrainConfig.from_dict(data)


def test_world_size_without_torchrun_is_said(monkeypatch):
    from napari_medseg.errors import MedsegError
    from napari_medseg.training.distributed import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(MedsegError, match="RANK is not set: start several processes with torchrun"):
        init_distributed("cpu")


def test_processes_and_networks_are_described_as_they_are():
    from napari_medseg.training.setup import processes_note

    assert processes_note(1, 8) == ""
    assert processes_note(2, 8).startswith("2 processes: batch_size 8 each, so 16 crops a step")
    assert ModelConfig("vanilla_unet").network_name == "vanilla_unet (32 base channels, depth 4)"
    assert ModelConfig("unet", "mobilenet_v2").network_name == "unet/mobilenet_v2"


def test_images_of_another_recorded_pixel_size_are_trained_at_the_runs(tmp_path):
    """A 20x TIFF (0.5 µm/px in its tags) in a 40x run had been trained on at its own pixels, its
    nuclei half the size, and the checkpoint said 0.25 µm/px: it is resampled x2 (labels and
    nuclei by nearest pixel) and the note says so; PNGs (no recorded size) stay as they are."""
    import json

    import numpy as np
    import tifffile

    from conftest import DATA
    from napari_medseg.io import read_image, read_label_map
    from napari_medseg.training.setup import prepare_data

    root = tmp_path / "lab"
    for sub in ("images", "labels", "instances"):
        (root / sub).mkdir(parents=True)
    stems = {"train_2_006": "at20x", "train_5_010": "at40x"}
    for stem, name in stems.items():
        image = read_image(DATA / "consep_train" / "images" / f"{stem}.png")
        labels = read_label_map(DATA / "consep_train" / "labels" / f"{stem}.tif")
        instances = read_label_map(DATA / "consep_train" / "instances" / f"{stem}.tif")
        if name == "at20x":  # half the pixels a side, as a 20x scan of the same field
            image, labels, instances = image[::2, ::2], labels[::2, ::2], instances[::2, ::2]
            tifffile.imwrite(root / "images" / f"{name}.tif", image, resolution=(1e4 / 0.5, 1e4 / 0.5),
                             resolutionunit="CENTIMETER")
        else:
            (root / "images" / f"{name}.png").symlink_to(DATA / "consep_train" / "images" / f"{stem}.png")
        tifffile.imwrite(root / "labels" / f"{name}.tif", labels)
        tifffile.imwrite(root / "instances" / f"{name}.tif", instances)
    (root / "classes.json").write_text(json.dumps({"classes": ["background", "other", "inflammatory", "epithelial",
                                                               "spindle"]}))
    cfg = TrainConfig.from_dict({"data": {"dataset": [str(root)], "val_fraction": 0}, "pixel_size_um": 0.25})
    data = prepare_data(cfg, None, None)
    shapes = {it.name: it.image.shape[:2] for it in data.train_items}
    assert shapes == {"at20x": (256, 256), "at40x": (256, 256)}
    at20x = next(it for it in data.train_items if it.name == "at20x")
    assert at20x.labels.shape == at20x.instances.shape == (256, 256)
    assert set(np.unique(at20x.labels)) <= set(range(5))  # ids, never blended
    assert data.resampled == "1 image at 0.5 µm/px resampled x2 to the run's 0.25 µm/px."
    unknown = TrainConfig.from_dict({"data": {"dataset": [str(root)], "val_fraction": 0}})
    assert prepare_data(unknown, None, None).resampled == ""  # a run without a pixel size takes images as they are
    # 20 µm/px tags (a magnification typed as the pixel size) had enlarged a tile 80-fold: 24 GB, killed
    image = read_image(root / "images" / "at20x.tif")
    tifffile.imwrite(root / "images" / "at20x.tif", image, resolution=(1e4 / 20, 1e4 / 20), resolutionunit="CENTIMETER")
    from napari_medseg.training.events import TrainingError

    with pytest.raises(TrainingError, match=r"1 training image \(at20x\) records 20 µm/px, more than 4.4x coarser"):
        prepare_data(cfg, None, None)


def test_stage_setting_that_on_cuda_would_replace_is_refused(tmp_path):
    """configs/all_data.yaml's second stage ("a lower cosine cycle", lr 0.00025) had run at the
    top-level on_cuda's lr 0.001 on a GPU: a stage setting on_cuda would silently replace is refused,
    with the fix; every shipped config resolves on a GPU as its stages say."""
    config = tmp_path / "stages.yaml"
    config.write_text("lr: 0.001\ndata: {crop_size: 128}\non_cuda: {lr: 0.002, data: {crop_size: 256}}\n"
                      "stages:\n  - name: first\n  - name: lower\n    lr: 0.0005\n    data: {crop_size: 96}\n"
                      "    on_cuda: {lr: 0.001}\n")
    with pytest.raises(TrainConfigError, match=r"Stage 'lower' sets data.crop_size 96 \(on_cuda: 256\).*"
                                               r"on_cuda: \{data: \{crop_size: \.\.\.\}\}"):
        load_train_stages(config)
    config.write_text(config.read_text().replace("on_cuda: {lr: 0.001}", "on_cuda: {lr: 0.001, data: {crop_size: 192}}"))
    first, lower = load_train_stages(config)
    assert (lower.config.lr, lower.config.data.crop_size) == (0.0005, 96)
    on_gpu = lower.config.for_device("cuda")
    assert (on_gpu.lr, on_gpu.data.crop_size) == (0.001, 192)
    assert first.config.for_device("cuda").lr == 0.002
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_train_stages(path)
    stages = load_train_stages(REPO / "configs" / "all_data.yaml")
    assert [s.config.for_device("cuda").lr for s in stages] == [0.001, 0.0005]
