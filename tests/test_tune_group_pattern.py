"""The tune commands find a model's own validation images however its run grouped them
(``data.group_pattern``), and say clearly when its recorded groups are unusable."""

from __future__ import annotations

import pytest

from napari_medseg.training import load_train_config, train

TINY = ["model.architecture=unet", "model.encoder=resnet18", "model.encoder_depth=3", "data.crop_size=64",
        "batch_size=4", "lr=0.003", "num_threads=1"]


@pytest.fixture(scope="module")
def per_image_model(consep, tmp_path_factory):
    """A tiny model trained on 6 CoNSeP patches grouped one group per image (not by source image)."""
    from conftest import copy_small_consep

    root = tmp_path_factory.mktemp("per_image")
    data = copy_small_consep(consep, root / "small")
    cfg = load_train_config(None, [*TINY, f"data.dataset=[{data}]", f"out_dir={root / 'run'}", "epochs=1",
                                   "data.val_fraction=0.34", "data.group_pattern=^(.*)$"])
    result = train(cfg)
    return result.checkpoint, data


@pytest.mark.usefixtures("one_torch_thread")
def test_the_tune_commands_find_the_validation_images_of_a_model_with_its_own_group_pattern(per_image_model, tmp_path):
    from napari_medseg.evaluation.class_choice import tune_classes_checkpoint
    from napari_medseg.evaluation.instance_tuning import tune_nuclei_checkpoint
    from napari_medseg.evaluation.threshold import tune_checkpoint
    from napari_medseg.models import read_meta

    checkpoint, data = per_image_model
    val_groups = read_meta(checkpoint).data["val_groups"]
    assert len(val_groups) == 2 and all(g.startswith("small/train_") and g.count("_") == 2 for g in val_groups)
    assert tune_checkpoint(checkpoint, data, tmp_path / "t.safetensors", device="cpu")["images"] == 2
    assert tune_nuclei_checkpoint(checkpoint, [data], tmp_path / "n.safetensors", device="cpu",
                                  marker_thresholds=(0.5,), min_sizes=(10,), min_marker_sizes=(5,))["images"] == \
        {"small": 2}
    result = tune_classes_checkpoint(checkpoint, data, tmp_path / "c.safetensors", device="cpu", grid=(1.0, 2.0))
    assert result["images"] == 2


def test_the_recorded_group_pattern_is_read_with_care():
    from types import SimpleNamespace

    from napari_medseg.evaluation.threshold import ThresholdTuningError, model_group_pattern
    from napari_medseg.io.dataset import GROUP_PATTERN

    def meta(training):
        return SimpleNamespace(training=training)

    assert model_group_pattern(meta({"config": {"data": {"group_pattern": "^(.*)$"}}})) == "^(.*)$"
    assert model_group_pattern(meta({})) == GROUP_PATTERN  # a model whose run recorded none: the default
    assert model_group_pattern(meta({"config": "junk"})) == GROUP_PATTERN
    for bad in (7, "(", "^.*$"):
        with pytest.raises(ThresholdTuningError, match="group_pattern"):
            model_group_pattern(meta({"config": {"data": {"group_pattern": bad}}}))


def _edited(checkpoint, out, **data_fields):
    """A copy of ``checkpoint`` with fields of its metadata's ``data`` replaced (as a hand edit would)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(checkpoint), "pt") as fh:
        header = fh.metadata()
    meta = json.loads(header["napari_medseg"])
    meta["data"].update(data_fields)
    save_file(load_file(str(checkpoint)), str(out), metadata={**header, "napari_medseg": json.dumps(meta)})
    return out


@pytest.mark.parametrize("val_groups", [7, "small/train_1", [1, 2], [""]])
def test_edited_validation_groups_are_refused_with_a_message(per_image_model, tmp_path, capsys, val_groups):
    from napari_medseg.cli import main
    from napari_medseg.evaluation.class_choice import tune_classes_checkpoint
    from napari_medseg.evaluation.instance_tuning import tune_nuclei_checkpoint
    from napari_medseg.evaluation.threshold import ThresholdTuningError, tune_checkpoint

    checkpoint, data = per_image_model
    edited = _edited(checkpoint, tmp_path / "edited.safetensors", val_groups=val_groups)
    for tune in (lambda: tune_checkpoint(edited, data, tmp_path / "t.safetensors", device="cpu"),
                 lambda: tune_nuclei_checkpoint(edited, [data], tmp_path / "n.safetensors", device="cpu"),
                 lambda: tune_classes_checkpoint(edited, data, tmp_path / "c.safetensors", device="cpu")):
        with pytest.raises(ThresholdTuningError, match="val_groups must be a list of source image names"):
            tune()
    assert main(["tune-threshold", str(edited), str(data), "--out", str(tmp_path / "t.safetensors"),
                 "--device", "cpu"]) == 2
    assert "val_groups must be a list" in capsys.readouterr().err
    assert not list(tmp_path.glob("[tnc].safetensors"))


@pytest.mark.parametrize("groups, step", [
    ([f"train_{i}" for i in range(1, 28)], 0),  # CoNSeP's source images: numbered, not coordinates
    ([f"TCGA-{i:02d}-5784-01Z-00-DX1" for i in range(13)], 0),  # MoNuSeg's cases
    ([f"slide{s}_{x}" for s in "AB" for x in (0, 512, 1024)], 512),  # '<slide>_<x>_<y>' tiles' columns
    ([f"consep/slide_{x}" for x in (0, 256)], 256),  # a mixed run's '<set>/<group>'
    ([f"slide{s}_{x}" for s, x in (("A", 0), ("B", 512))], 0),  # one name each: nothing to join
    (["a_0", "a_32"], 0),  # steps below a tile's size
])
def test_tile_row_step_tells_coordinates_from_numbered_images(groups, step):
    from napari_medseg.io.dataset import tile_row_step

    assert tile_row_step(groups) == step


def test_a_mixed_runs_split_is_said_per_set_and_the_tile_note_names_its_set():
    import numpy as np

    from napari_medseg.io.dataset import GROUP_PATTERN
    from napari_medseg.training.items import LabelledImage
    from napari_medseg.training.setup import TrainingData, describe_split

    pixels, labels = np.zeros((4, 4, 3), np.float32), np.zeros((4, 4), np.uint8)

    def item(dataset, group):
        return LabelledImage(group, f"{dataset}/{group}", pixels, labels, dataset=dataset)

    train = [item("consep", f"train_{i}") for i in (1, 2, 3)] + [item("tiles", f"slideA_{x}") for x in (0, 512)]
    val = [item("consep", "train_4"), item("tiles", "slideB_0"), item("tiles", "slideB_0")]
    data = TrainingData(["background", "nucleus"], train, val, 0, np.ones(2), None, [], [0], mixed=True)
    split = describe_split(data, GROUP_PATTERN)
    assert split.lines() == [
        "consep: training on 3 images of 3 source images; validating on 1 image of 1 (train_4)",
        "tiles: training on 2 images of 2 source images; validating on 2 images of 1 (slideB_0)",
    ]
    assert split.note.startswith("tiles: the source images found (slideA_0, slideA_512, slideB_0, ...) end in "
                                 "multiples of 512") and "consep" not in split.note
    assert describe_split(data, r"^(.*)_\d+_\d+$").note == ""  # a pattern of the user's own: not second-guessed
