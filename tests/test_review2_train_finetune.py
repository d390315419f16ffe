"""Fine-tuning the shipped default (5 CoNSeP classes) on a small folder of nucleus-only masks
(real TNBC images), as a user does: the folder given as a binary set trains the model's nuclei
and keeps its classes; given as a class set, the refusal says what to do; ``init_checkpoint:
default`` names the shipped model, as ``--model default`` does."""

from __future__ import annotations

import shutil

import pytest

from napari_medseg.models import DEFAULT_MODEL_PATH, read_meta
from napari_medseg.training import TrainConfigError, load_train_config, train
from napari_medseg.training.stages import load_train_stages, train_stages

from conftest import DATA

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TNBC = DATA / "tnbc_train"


@pytest.fixture
def small_tnbc(tmp_path):
    """4 real TNBC images (512², nucleus / background) of 2 slides."""
    if not TNBC.is_dir():
        pytest.fail(f"Real test data missing: {TNBC}.")
    out = tmp_path / "tnbc_small"
    stems = ["tnbc_01_1", "tnbc_01_2", "tnbc_02_1", "tnbc_02_2"]
    for sub in ("images", "labels", "instances"):
        (out / sub).mkdir(parents=True)
        for stem in stems:
            (found,) = (TNBC / sub).glob(f"{stem}.*")
            shutil.copy(found, out / sub / found.name)
    shutil.copy(TNBC / "classes.json", out / "classes.json")
    return out


FT = ["data.crop_size=128", "data.val_fraction=0.5", "batch_size=2", "epochs=1", "lr=0.0005", "num_threads=1",
      "save_resume=false", "tune_threshold=false"]


def test_the_default_fine_tuned_on_a_binary_set_keeps_its_classes(small_tnbc, tmp_path):
    """Before: refused, 'init_checkpoint was trained for classes [...5...], but the data has
    ['background', 'nucleus']' (a binary set trains the summed nucleus probability, which any
    class list has)."""
    cfg = load_train_config(None, [*FT, f"init_checkpoint={DEFAULT_MODEL_PATH}", f"out_dir={tmp_path / 'ft'}",
                                   f"data.datasets=[{{path: {small_tnbc}, labels: binary}}]"])
    done = train(cfg)
    meta = read_meta(done.checkpoint)
    assert meta.classes == read_meta(DEFAULT_MODEL_PATH).classes
    assert done.best_metrics["sets"]["tnbc_small"]["nucleus_dice"] > 0.5  # the default finds TNBC's nuclei


def test_the_default_on_a_nucleus_only_class_set_is_refused_saying_what_to_do(small_tnbc, tmp_path):
    cfg = load_train_config(None, [*FT, f"init_checkpoint={DEFAULT_MODEL_PATH}", f"out_dir={tmp_path / 'ft'}",
                                   f"data.dataset=[{small_tnbc}]"])
    with pytest.raises(TrainConfigError) as error:
        train(cfg)
    message = str(error.value)
    assert "['background', 'nucleus']" in message and "labels: binary" in message and "data.datasets" in message
    assert not (tmp_path / "ft" / "best.safetensors").exists()


def test_init_checkpoint_default_is_the_shipped_model(tmp_path):
    """Before: "Stage '' starts from 'default', which does not exist." (``--model default`` names it
    everywhere else)."""
    config = tmp_path / "ft.yaml"
    config.write_text("init_checkpoint: default\naverage_with_start: 0.5\naverage_with: default\n"
                      f"data: {{dataset: [x], crop_size: 128}}\nout_dir: {tmp_path / 'ft'}\n")
    (stage,) = load_train_stages(config)
    assert stage.config.init_checkpoint == str(DEFAULT_MODEL_PATH)
    assert stage.config.average_with == str(DEFAULT_MODEL_PATH)


def test_a_missing_start_of_a_config_without_stages_names_the_setting(tmp_path):
    config = tmp_path / "ft.yaml"
    config.write_text(f"init_checkpoint: {tmp_path / 'gone.safetensors'}\ndata: {{dataset: [x], crop_size: 128}}\n"
                      f"out_dir: {tmp_path / 'ft'}\n")
    with pytest.raises(Exception) as error:
        train_stages(load_train_stages(config))
    assert str(error.value) == f"init_checkpoint '{tmp_path / 'gone.safetensors'}' does not exist."
