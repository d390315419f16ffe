"""Hostile training configs: every wrongly typed or impossible setting is refused before any
training starts, by a message that names the config file and the key; nothing is written."""

from __future__ import annotations

import pytest
from hostile import assert_refused, medseg, tiny_dataset

GOOD = "model: {architecture: vanilla_unet, base_channels: 4, depth: 2}\nepochs: 1\n"


@pytest.fixture
def setup(tmp_path):
    data = tiny_dataset(tmp_path / "data")
    return tmp_path, f"data: {{dataset: [{data}], crop_size: 16}}\nout_dir: {tmp_path / 'run'}\n"


@pytest.mark.parametrize("line, key", [
    ("lr: [0.002]", "lr must be a number"),
    ("model: {architecture: vanilla_unet, encoder_depth: three}", "model.encoder_depth must be an integer"),
    ("augment: {scale: 5}", "augment.scale must be [number, number]"),
    ("seed: abc", "seed must be an integer"),
    ("epochs: true", "epochs must be an integer"),
    ("batch_size: 2.5", "batch_size must be an integer"),
    ("augment: {flip: maybe}", "augment.flip must be true or false"),
    ("data: {val_fraction: lots}", "data.val_fraction must be a number"),
    ("normalization: {mean: [0.5], std: [0]}", "normalization std must be above 0"),
    ("class_weights: [a, b]", "class_weights must be a list of numbers"),
    ("monitor: val_mIoU", "monitor 'val_mIoU' is not one of val_loss, val_miou"),  # was: after a full epoch
    ("lr: .nan", "lr must be a number"),
    ("model: [unet]", "'model' must be a mapping"),
    ("distance_gradient_weight: -2", "distance_gradient_weight must be a number of at least 0"),
])
def test_a_wrong_setting_names_the_file_and_the_key(setup, line, key):
    tmp_path, head = setup
    config = tmp_path / "bad.yaml"
    config.write_text(head + GOOD + line + "\n")
    err = assert_refused(medseg("train", config), f"{config}: ", key)
    assert err.count("\n") == 1  # one line: the message, nothing else
    assert not (tmp_path / "run").exists()


def test_a_dataset_that_is_a_number_is_named(setup):
    tmp_path, _ = setup
    config = tmp_path / "bad.yaml"
    config.write_text(f"data: {{dataset: 5}}\nout_dir: {tmp_path / 'run'}\n" + GOOD)
    assert_refused(medseg("train", config, process=True), f"{config}: data.dataset must be a list of texts, got 5")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, fragment", [
    ("lr: [0.002\n", "(line 2, column 1)"),
    ("a: b: c\n", "(line 1, column 5)"),
    ("\t- x\n", "not valid YAML"),
])
def test_yaml_syntax_errors_name_the_file_and_the_line(tmp_path, text, fragment):
    config = tmp_path / "broken.yaml"
    config.write_text(text)
    assert_refused(medseg("train", config), f"Config file '{config}' is not valid YAML", fragment)


def test_a_wrongly_typed_override_names_the_key(setup):
    tmp_path, head = setup
    config = tmp_path / "ok.yaml"
    config.write_text(head + GOOD)
    assert_refused(medseg("train", config, "--set", "model.depth=two"), "model.depth must be an integer, got 'two'")
    assert_refused(medseg("train", config, "--set", "epochs=0"), "epochs must be an integer of at least 1")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("setting, fragment", [  # each was a traceback from torch, mid-run or at its start
    ("data.samples_per_epoch=-1", "data.samples_per_epoch must be at least 0"),
    ("augment.scale=[2,1]", "augment.scale must be [low, high] with 0 < low <= high"),
    ("augment.scale=[0,1]", "augment.scale must be [low, high]"),
    ("augment.hue=0.9", "augment.hue must lie in [0, 0.5]"),
    ("augment.brightness=-1", "augment.brightness must lie in [0, 1)"),
    ("num_threads=-3", "num_threads must be at least 0"),
    ("data.num_workers=-1", "data.num_workers must be at least 0"),
    ("weight_decay=-1", "weight_decay must be at least 0"),
    ("patience=-1", "patience must be at least 0"),  # was silent: stopped after epoch 1
    ("data.group_pattern=^train_[0-9]+", "needs a group"),
    ("data.group_pattern=([", "is not a regular expression"),
])
def test_settings_out_of_range_are_refused_before_the_run(setup, setting, fragment):
    tmp_path, head = setup
    config = tmp_path / "ok.yaml"
    config.write_text(head + GOOD)
    assert_refused(medseg("train", config, "--set", setting), fragment)
    assert not (tmp_path / "run").exists()


def test_a_config_that_is_not_text_or_a_mapping(tmp_path):
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(b"\x80\x04\x95\xff\xfe")
    assert_refused(medseg("train", binary), f"'{binary}'")
    listed = tmp_path / "list.yaml"
    listed.write_text("- lr: 0.1\n")
    assert_refused(medseg("train", listed), f"{listed}: the top level must be a mapping")
    assert_refused(medseg("train", tmp_path), f"'{tmp_path}' is a folder")  # was: "does not exist"
