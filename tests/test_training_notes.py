"""What ``medseg train`` and ``predict`` say that a new user would otherwise not know. A fine-tune
(``init_checkpoint``) keeps its start's pixel size and says what of the config the start overrode
and the threshold it tuned: before, a fine-tuned default recorded no pixel size and ran 20x slides
unscaled (304 nuclei on an SVS region where the default found 496), its config's network was
replaced without a word, and ``--pixel-size`` did nothing for it, silently. A crop larger than
every training image is said before the first epoch."""

from __future__ import annotations

from hostile import medseg, tiny_dataset, tiny_model

from napari_medseg.models import read_meta


def _fine_tune_config(tmp_path, start, data, out):
    path = tmp_path / "ft.yaml"
    path.write_text(f"model: {{architecture: unet, encoder: resnet18, encoder_depth: 3}}\n"
                    f"init_checkpoint: {start}\ndata: {{dataset: [{data}], crop_size: 16, val_fraction: 0.34}}\n"
                    f"out_dir: {out}\nepochs: 1\nbatch_size: 2\nnum_threads: 1\ntune_threshold: true\n")
    return path


def test_a_fine_tune_keeps_its_starts_pixel_size_and_says_what_it_overrode(tmp_path):
    start = tiny_model(tmp_path / "start.safetensors", pixel_size_um=0.25)
    data = tiny_dataset(tmp_path / "data")
    proc = medseg("train", _fine_tune_config(tmp_path, start, data, tmp_path / "ft"))
    assert proc.returncode == 0, proc.stderr
    meta = read_meta(tmp_path / "ft" / "best.safetensors")
    assert meta.pixel_size_um == 0.25
    assert meta.model.architecture == "vanilla_unet"  # the start's network: its weights fit no other
    assert "the config's model settings are not used (architecture unet -> vanilla_unet" in proc.stderr
    images = meta.metrics["threshold_tuning"]["images"]
    assert f"foreground threshold {meta.foreground_threshold:.2f}, tuned on the {images} validation images" in proc.stdout
    assert f"caution: tuned on {images} images" in proc.stderr


def test_pixel_size_given_for_a_model_that_records_none_is_said(tmp_path):
    data = tiny_dataset(tmp_path / "data", stems=("a_0",))
    image = data / "images" / "a_0.png"
    unscaled = tiny_model(tmp_path / "unscaled.safetensors")
    proc = medseg("predict", image, "--model", unscaled, "--pixel-size", "0.5", "--out", tmp_path / "out1")
    assert proc.returncode == 0, proc.stderr
    assert "the model records no pixel size, so --pixel-size 0.5 rescales nothing" in proc.stderr
    scaled = tiny_model(tmp_path / "scaled.safetensors", pixel_size_um=0.25)
    proc = medseg("predict", image, "--model", scaled, "--pixel-size", "0.5", "--out", tmp_path / "out2")
    assert proc.returncode == 0, proc.stderr
    assert "rescales nothing" not in proc.stderr


def test_a_crop_larger_than_every_training_image_is_said_before_the_first_epoch(tmp_path):
    """crop_size 512 on 256² patches had been taken without a word, at 38 s an epoch for 1 s."""
    data = tiny_dataset(tmp_path / "data")  # 32 x 32 images
    config = tmp_path / "big_crops.yaml"
    config.write_text(f"model: {{architecture: vanilla_unet, base_channels: 4, depth: 2}}\n"
                      f"data: {{dataset: [{data}], crop_size: 48}}\nout_dir: {tmp_path / 'run'}\nepochs: 1\n")
    proc = medseg("train", config)
    assert proc.returncode == 0, proc.stderr
    assert "data.crop_size 48 is larger than the training images (at most 32 x 32 px)" in proc.stderr
    assert "set data.crop_size to 32 or less" in proc.stderr
    config.write_text(config.read_text().replace("crop_size: 48", "crop_size: 32") + "save_resume: false\n")
    proc = medseg("train", config, "--overwrite")
    assert proc.returncode == 0 and "larger than the training images" not in proc.stderr


def test_a_fine_tune_that_trains_on_its_starts_held_out_images_says_so_and_records_it(tmp_path):
    """A fine-tune of the default with another seed had split otherwise and trained on the default's
    held-out source images without a word: its 'held-out' figures would then flatter it."""
    data = tiny_dataset(tmp_path / "data", stems=("a_0", "a_1", "b_0", "c_0"))
    start = tiny_model(tmp_path / "start.safetensors", data={"val_groups": ["data/a", "data/b"], "split_seed": 7})
    proc = medseg("train", _fine_tune_config(tmp_path, start, data, tmp_path / "ft"))
    assert proc.returncode == 0, proc.stderr
    record = read_meta(tmp_path / "ft" / "best.safetensors").data
    trained = sorted({"data/a", "data/b"} - set(record["val_groups"]))
    assert trained and record["trains_on_start_held_out"] == trained
    assert (f"This run trains on {len(trained)} source image{'s' if len(trained) > 1 else ''} the start checkpoint "
            f"held out for validation ({', '.join(trained)})") in proc.stderr
    assert "set data.split_seed: 7 to validate on the start's held-out images" in proc.stderr

    # the start held out what this run validates on: nothing to say, nothing recorded
    same = tiny_model(tmp_path / "same.safetensors", data={"val_groups": record["val_groups"], "split_seed": 0})
    proc = medseg("train", _fine_tune_config(tmp_path, same, data, tmp_path / "ft2"))
    assert proc.returncode == 0, proc.stderr
    assert "held out for validation" not in proc.stderr
    assert "trains_on_start_held_out" not in read_meta(tmp_path / "ft2" / "best.safetensors").data


def test_images_that_record_no_pixel_size_are_said_once_to_be_taken_as_the_models(tmp_path):
    """A 20x PNG was cut into a third fewer nuclei, taken as 40x without a word (335 for 496 on a
    crop of the Aperio slide); now said once a run, with how to give the size."""
    data = tiny_dataset(tmp_path / "data", stems=("a_0", "a_1"))
    images = [data / "images" / "a_0.png", data / "images" / "a_1.png"]
    model = tiny_model(tmp_path / "m.safetensors", pixel_size_um=0.25)
    proc = medseg("predict", *images, "--model", model, "--out", tmp_path / "out1")
    assert proc.returncode == 0, proc.stderr
    note = ("2 of the 2 images record no pixel size: taken as the model's 0.25 µm/px (40x), where a 20x image gives "
            "fewer, larger nuclei; for another magnification give --pixel-size UM (0.5 at 20x)")
    assert proc.stderr.count(note) == 1, proc.stderr
    for given in ("0.5", "none"):  # said how to take them: nothing to add
        proc = medseg("predict", *images, "--model", model, "--pixel-size", given, "--out", tmp_path / f"out_{given}")
        assert proc.returncode == 0, proc.stderr
        assert "record no pixel size" not in proc.stderr
    unscaled = tiny_model(tmp_path / "unscaled.safetensors")  # a model with none: nothing taken as anything
    proc = medseg("predict", images[0], "--model", unscaled, "--out", tmp_path / "out2")
    assert proc.returncode == 0 and "no pixel size" not in proc.stderr, proc.stderr
