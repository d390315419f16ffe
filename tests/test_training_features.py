"""Trainer features on real CoNSeP data: early stopping, exact resume, oversampling, losses,
binary mode, PanNuke folds, in-memory data, bad input, repeats, the shipped configs."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_medseg.io.dataset import DatasetError
from napari_medseg.models import load_checkpoint, read_meta
from napari_medseg.training import EpochDone, TrainingError, load_train_config, train
from napari_medseg.training.data import (LabelledImage, PatchDataset, load_dataset_folders, oversample_indices,
                                         pixel_frequencies, rare_classes, split_by_group)
from napari_medseg.training.early_stopping import PatienceStop, QuadraticStop, quadratic_slope
from napari_medseg.training.losses import IGNORE_INDEX, build_loss

from test_resume_exact import stop_in_epoch_2

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.architecture=unet", "model.encoder=resnet18", "model.encoder_depth=3", "data.crop_size=64",
        "batch_size=4", "lr=0.003", "num_threads=1"]


def tiny_config(dataset, out_dir, *extra):
    return load_train_config(None, [*TINY, f"data.dataset=[{dataset}]", f"out_dir={out_dir}", *extra])


@pytest.fixture(scope="module")
def consep_items(consep):
    return load_dataset_folders([str(consep)], r"^(.*)_\d+$")


# -- early stopping against hand-computed sequences -------------------------------------------
def test_constrained_quadratic_slope_by_hand():
    # q(t) = 3 - 0.5 t + a t (t - 2) through (0, 3) and (2, 2); the inner point 1 gives a = 1.5
    # exactly, so q'(2) = -0.5 + 1.5 * 2 = 2.5.
    assert quadratic_slope([3.0, 1.0, 2.0]) == pytest.approx(2.5)
    # a loss on an exact parabola is fitted exactly: 0.02 (t - 9)^2 + 1 has slope 0 at t = 9
    assert quadratic_slope([0.02 * (t - 9) ** 2 + 1 for t in range(10)]) == pytest.approx(0.0, abs=1e-12)
    # and a straight line keeps its slope
    assert quadratic_slope([2.0 - 0.1 * t for t in range(10)]) == pytest.approx(-0.1)
    # least squares over the inner points: for [1, 0, 0, 1] with t(t-3) = -2, -2 and line residuals
    # -1, -1: a = 4 / 8 = 0.5, q'(3) = 0 + 0.5 * 3 = 1.5
    assert quadratic_slope([1.0, 0.0, 0.0, 1.0]) == pytest.approx(1.5)


def test_quadratic_stop_rule_epochs():
    def stop_epoch(losses, **kw):
        rule = QuadraticStop(**kw)
        for epoch, loss in enumerate(losses, 1):
            if rule.update(epoch, loss):
                return epoch
        return None

    # a flat loss is flat from epoch 10 (the first full window): epochs 10..15 are 6 > 5 flat epochs
    assert stop_epoch([1.0] * 30) == 15
    # a steadily falling loss (0.1 per epoch, threshold 0.001) never stops
    assert stop_epoch([5.0 - 0.1 * e for e in range(40)]) is None
    # a rising loss counts as flat (no decrease)
    assert stop_epoch([1.0 + 0.01 * e for e in range(30)]) == 15
    # falling fast until epoch 14, then flat: windows ending at 15.. still contain the fall;
    # by hand the fitted slope at the window end stays below -0.001 until the window is flat
    losses = [2.0 - 0.1 * e for e in range(14)] + [0.7] * 30
    slopes = [quadratic_slope(losses[i - 9:i + 1]) for i in range(9, len(losses))]
    flat = [e + 10 for e, s in enumerate(slopes) if -s < 1e-3]
    first_run = next(e for e in flat if all(x in flat for x in range(e, e + 6)))
    assert stop_epoch(losses) == first_run + 5
    assert stop_epoch(losses) > 15
    # one non-flat epoch resets the count
    seq = [1.0] * 13 + [0.5] + [0.5] * 30
    assert stop_epoch(seq) > 15


def test_patience_rule_with_min_delta():
    rule = PatienceStop(patience=3)
    decisions = [rule.update(v) for v in [1.0, 0.9, 0.95, 0.91, 0.905, 0.8]]
    assert decisions == [(True, False), (True, False), (False, False), (False, False), (False, True), (True, False)]
    rule = PatienceStop(patience=2, min_delta=0.01)
    # 0.895 is not 0.01 better than 0.9; 0.889 is (by 0.011)
    assert [rule.update(v)[0] for v in [1.0, 0.9, 0.895, 0.889]] == [True, True, False, True]
    rule = PatienceStop(patience=2, higher_is_better=True)
    assert [rule.update(v) for v in [0.5, 0.4, 0.45]] == [(True, False), (False, False), (False, True)]


def test_trainer_stops_by_both_rules(small_consep, tmp_path):
    # min_delta 10: only the first epoch counts as an improvement -> patience 1 stops at epoch 2;
    # the best epoch is still the lower validation loss of the two (min_delta is for stopping)
    updates = []
    result = train(tiny_config(small_consep, tmp_path / "p", "epochs=6", "patience=1", "min_delta=10"),
                   on_update=updates.append)
    assert result.stopped_early and len(result.history) == 2
    assert result.best_epoch == min(result.history, key=lambda h: h["val_loss"])["epoch"]
    assert "for 1 epochs" in result.reason
    assert [u.stop_reason != "" for u in updates if isinstance(u, EpochDone)] == [False, True]
    # quadratic rule with window 3 from epoch 3 and a huge threshold: every fitted epoch is flat,
    # epochs 3 and 4 make 2 > 1 -> stop after epoch 4
    cfg = tiny_config(small_consep, tmp_path / "q", "epochs=8", "quadratic_stop.enabled=true",
                      "quadratic_stop.window=3", "quadratic_stop.start=3", "quadratic_stop.patience=1",
                      "quadratic_stop.threshold=1e9")
    result = train(cfg)
    assert result.stopped_early and len(result.history) == 4 and "quadratic" in result.reason


# -- exact resume ---------------------------------------------------------------------------
def _resume_tensors(path):
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(path)).items() if k.startswith("model.")}


def test_resume_continues_exactly(small_consep, tmp_path):
    from napari_medseg.training.resume import ResumeError

    extra = ("epochs=3", "data.val_fraction=0.34", "data.crops_per_image=2")
    full = train(tiny_config(small_consep, tmp_path / "full", *extra))
    assert len(full.history) == 3
    part = train(tiny_config(small_consep, tmp_path / "part", *extra), should_stop=stop_in_epoch_2())
    assert part.reason == "stopped by user" and len(part.history) == 1
    resumed = train(tiny_config(small_consep, tmp_path / "part", *extra, f"resume={part.resume}"))
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    a, b = _resume_tensors(full.resume), _resume_tensors(resumed.resume)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical weights, buffers included
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in full.history]
    assert resumed.best_epoch == full.best_epoch
    # another config, or a best checkpoint instead of the resume file, is refused
    with pytest.raises(ResumeError, match="lr"):
        train(tiny_config(small_consep, tmp_path / "x", *extra, "lr=0.1", f"resume={part.resume}"))
    with pytest.raises(ResumeError, match="not a napari-medseg resume file"):
        train(tiny_config(small_consep, tmp_path / "y", *extra, f"resume={full.checkpoint}"))


def test_save_resume_off_writes_only_the_best_checkpoint(small_consep, tmp_path):
    result = train(tiny_config(small_consep, tmp_path / "run", "epochs=1", "data.val_fraction=0.34",
                               "data.crops_per_image=1", "save_resume=false"))
    assert result.checkpoint is not None and result.checkpoint.is_file()
    assert result.resume is None
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["best.safetensors"]


# -- oversampling ---------------------------------------------------------------------------
def test_oversampling_raises_the_share_of_rare_class_patches(consep_items):
    items, classes = consep_items
    train_items, _ = split_by_group(items, 0.15, seed=0)
    freq = pixel_frequencies(train_items, len(classes))
    cfg = load_train_config(None, ["oversample.factor=4"]).oversample
    rare = rare_classes(freq, cfg)
    assert rare == [1]  # 'other': the only CoNSeP class under 2 % of the pixels
    plain = oversample_indices(train_items, rare, 0, cfg.min_share)
    boosted = oversample_indices(train_items, rare, 4, cfg.min_share)
    rich = {i for i in boosted if boosted.count(i) > 1}
    assert 0 < len(rich) < len(train_items) and len(boosted) == len(plain) + 4 * len(rich)

    def share_with_rare(index):
        torch.manual_seed(0)
        ds = PatchDataset(train_items, 64, 1, None, index=index)  # random 64x64 crops
        hits = sum(bool((ds[i][1] == 1).any()) for i in range(len(ds)))
        return hits / len(ds)

    before, after = share_with_rare(plain), share_with_rare(boosted)
    assert after > 1.5 * before, (before, after)


# -- losses ---------------------------------------------------------------------------------
def test_losses_on_real_labels(consep_items):
    items, classes = consep_items
    labels = torch.from_numpy(np.stack([it.labels for it in items[:4]]).astype(np.int64))[:, :64, :64]
    labels[0, :4] = IGNORE_INDEX
    torch.manual_seed(0)
    logits5 = torch.randn(4, 5, 64, 64, requires_grad=True)
    binary = torch.where(labels == IGNORE_INDEX, labels, (labels > 0).long())
    logits2 = torch.randn(4, 2, 64, 64, requires_grad=True)
    for name in ("ce", "weighted_ce", "bce", "dice", "log_cosh_dice", "focal", "ce_dice"):
        for logits, target, n in ((logits5, labels, 5), (logits2, binary, 2)):
            w = torch.tensor([0.1] + [1.0] * (n - 1))
            loss = build_loss(name, w, num_classes=n)(logits, target)
            assert torch.isfinite(loss) and loss > 0, name
            (grad,) = torch.autograd.grad(loss, logits)
            assert grad[0, :, :4].abs().max() == 0, f"{name}: ignored pixels must get no gradient"
    # binary BCE on the foreground logit l1 - l0 equals 2-class cross-entropy exactly
    bce = build_loss("bce", num_classes=2)(logits2, binary)
    ce = torch.nn.functional.cross_entropy(logits2, binary, ignore_index=IGNORE_INDEX)
    assert bce.item() == pytest.approx(ce.item(), rel=1e-5)
    # Log-Cosh Dice is log(cosh(Dice loss))
    dice = build_loss("dice", num_classes=5)(logits5, labels)
    assert build_loss("log_cosh_dice", num_classes=5)(logits5, labels).item() == pytest.approx(
        float(torch.log(torch.cosh(dice))), rel=1e-6)
    # a perfect binary prediction has a Dice loss near 0
    perfect = torch.stack([(binary != 1).float(), (binary == 1).float()], 1) * 40 - 20
    assert build_loss("dice", num_classes=2)(perfect, binary).item() < 1e-3


# -- binary mode, PanNuke, in-memory data ------------------------------------------------------
def test_binary_training_gives_a_two_class_checkpoint_for_inference(small_consep, tmp_path):
    from napari_medseg.inference import Segmenter, TileSettings
    from napari_medseg.io import read_image

    result = train(tiny_config(small_consep, tmp_path / "b", "epochs=1", "data.binary=true", "loss=bce",
                               "normalization=imagenet"))
    model, meta = load_checkpoint(result.checkpoint)
    assert meta.classes == ["background", "nucleus"] and meta.model.num_classes == 2
    assert meta.data["binary"] is True and meta.normalization["mean"][0] == pytest.approx(0.485)
    seg = Segmenter(model, meta, torch.device("cpu"))
    labels = seg.segment(read_image(small_consep / "images" / "train_1_005.png"), TileSettings(64, 16, 4))
    assert labels.shape == (256, 256) and labels.max() <= 1


def test_pannuke_fold_trains(consep, tmp_path):
    from napari_medseg.io.pannuke import PANNUKE_CLASSES
    from napari_medseg.io import read_image, read_label_map

    fold = tmp_path / "fold1"
    fold.mkdir()
    stems = ["train_1_005", "train_2_005", "train_3_005", "train_4_005"]
    images = np.stack([read_image(consep / "images" / f"{s}.png") for s in stems]).astype(np.float64)
    masks = np.zeros((4, 256, 256, 6), np.float64)
    for i, s in enumerate(stems):  # CoNSeP classes 1..4 into PanNuke channels 0..3, instances kept
        cls, inst = read_label_map(consep / "labels" / f"{s}.tif"), read_label_map(consep / "instances" / f"{s}.tif")
        for c in range(1, 5):
            masks[i, ..., c - 1] = np.where(cls == c, inst, 0)
        masks[i, ..., 5] = (cls == 0)
    np.save(fold / "images.npy", images)
    np.save(fold / "masks.npy", masks)
    np.save(fold / "types.npy", np.array(["Colon"] * 4))
    result = train(tiny_config(fold, tmp_path / "run", "epochs=1", "data.val_fraction=0.25"))
    meta = read_meta(result.checkpoint)
    assert meta.classes == PANNUKE_CLASSES and meta.data["train_images"] == 3 and meta.data["val_images"] == 1
    # the class map survives the round trip through the fold's instance channels
    freq = np.array(meta.data["train_pixel_frequencies"])
    assert freq[5] == 0 and freq[0] > 0.5


def test_in_memory_items_are_checked_before_training(consep_items, tmp_path):
    items, classes = consep_items
    good = [LabelledImage(it.name, it.group, it.image, it.labels) for it in items[:6]]
    cfg = tiny_config("unused", tmp_path / "m", "epochs=1", "data.val_fraction=0")
    done = train(cfg, items=(good, classes))
    assert done.checkpoint.is_file() and read_meta(done.checkpoint).data["datasets"] == ["in-memory"]
    bad = good[:2] + [LabelledImage("x", "g", good[0].image, np.full((256, 256), 7, np.uint8))]
    with pytest.raises(DatasetError, match="class id 7.*only 5 classes"):
        train(cfg, items=(bad, classes))
    mismatch = good[:2] + [LabelledImage("y", "g", good[0].image, good[0].labels[:100])]
    with pytest.raises(DatasetError, match="do not match its image"):
        train(cfg, items=(mismatch, classes))
    with pytest.raises(DatasetError, match="empty"):
        train(cfg, items=([], classes))


# -- bad input on disk ------------------------------------------------------------------------
def test_bad_dataset_folders_are_refused_before_training(small_consep, tmp_path):
    import shutil

    from napari_medseg.io.images import write_label_map

    def fresh(name):
        copy = tmp_path / name
        shutil.copytree(small_consep, copy)
        return copy

    extra = fresh("extra")
    shutil.copy(extra / "labels" / "train_1_005.tif", extra / "labels" / "orphan.tif")
    with pytest.raises(DatasetError, match="without an image: orphan"):
        train(tiny_config(extra, tmp_path / "r1"))
    small = fresh("size")
    write_label_map(small / "labels" / "train_2_006.tif", np.zeros((128, 128), np.uint8))
    with pytest.raises(DatasetError, match=r"train_2_006.tif has shape \(128, 128\)"):
        train(tiny_config(small, tmp_path / "r2"))
    beyond = fresh("beyond")
    write_label_map(beyond / "labels" / "train_3_005.tif", np.full((256, 256), 9, np.uint8))
    with pytest.raises(DatasetError, match="class id 9"):
        train(tiny_config(beyond, tmp_path / "r3"))
    for run in ("r1", "r2", "r3"):
        assert not list((tmp_path / run).glob("*.safetensors"))


def test_full_disk_is_refused_before_training(small_consep, tmp_path, monkeypatch):
    import shutil

    import napari_medseg.training.checkpoints as checkpoints_module

    real = shutil.disk_usage
    monkeypatch.setattr(checkpoints_module.shutil, "disk_usage", lambda p: real(p)._replace(free=10_000_000))
    with pytest.raises(TrainingError, match="Not enough free space"):
        train(tiny_config(small_consep, tmp_path / "run"))


def test_failed_write_keeps_the_previous_best_checkpoint_intact(small_consep, tmp_path, monkeypatch):
    import safetensors.torch as st

    real_save = st.save_file
    writes = {"n": 0}

    def failing_save(tensors, filename, metadata=None):
        writes["n"] += 1
        if writes["n"] == 3:  # epoch 1 wrote best + resume; epoch 2's best fails half-way
            Path(filename).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(st, "save_file", failing_save)
    monitored = iter([2.0, 1.0])  # every epoch improves
    monkeypatch.setattr("napari_medseg.training.progress.monitor_value", lambda *args: next(monitored))
    cfg = tiny_config(small_consep, tmp_path / "run", "epochs=2")
    with pytest.raises(TrainingError, match="No space left.*previous best checkpoint"):
        train(cfg)
    model, meta = load_checkpoint(tmp_path / "run" / "best.safetensors")
    assert meta.training["best_epoch"] == 1
    assert not list((tmp_path / "run").glob("*.part"))


# -- repeats ----------------------------------------------------------------------------------
def test_repeats_report_mean_and_std(small_consep, tmp_path):
    from napari_medseg.training.repeat import train_repeats

    cfg = tiny_config(small_consep, tmp_path / "rep", "epochs=1", "repeats=2", "seed=5")
    done = train_repeats(cfg)
    assert done.seeds == [5, 6] and len(done.runs) == 2
    values = [r.best_metrics["val_loss"] for r in done.runs]
    assert values[0] != values[1]  # different seeds, different runs
    assert done.summary["val_loss"]["mean"] == pytest.approx(np.mean(values))
    assert done.summary["val_loss"]["std"] == pytest.approx(np.std(values, ddof=1))
    report = json.loads(done.path.read_text())
    assert report["seeds"] == [5, 6] and (tmp_path / "rep" / "seed_6" / "best.safetensors").is_file()
    # the same held-out images in every run: only training randomness varies
    metas = [read_meta(r.checkpoint) for r in done.runs]
    assert metas[0].data["val_groups"] == metas[1].data["val_groups"]


# -- shipped experiment configs -----------------------------------------------------------------
def test_experiment_configs_match_the_reports():
    def cfg(name):
        return load_train_config(REPO / "configs" / f"{name}.yaml")

    for name, arch, enc in (("pannuke_vanilla_unet_wce", "vanilla_unet", None),
                            ("pannuke_resnet50_unet_wce", "unet", "resnet50"),
                            ("pannuke_resnet50_deeplabv3plus_wce", "deeplabv3plus", "resnet50")):
        c = cfg(name)
        assert (c.model.architecture, c.loss, c.class_weights, c.batch_size, c.patience) == (
            arch, "weighted_ce", "auto", 4, 12)
        assert enc is None or c.model.encoder == enc
    c = cfg("binary_unet_bce")
    assert c.data.binary and c.loss == "bce" and c.patience == 5
    c = cfg("binary_unet_quadratic_stop")
    assert c.data.binary and c.quadratic_stop.enabled and c.quadratic_stop.window == 10
    assert c.quadratic_stop.patience == 5 and c.quadratic_stop.start == 10
    assert c.oversample.factor > 0 and c.model.dropout > 0 and c.repeats == 3
    assert cfg("attention_res_unet").model.architecture == "attention_res_unet"
    for enc in ("vgg19", "resnet50", "densenet121"):
        for loss in ("bce", "log_cosh_dice"):
            c = cfg(f"grid_{enc}_{loss}")
            assert (c.model.encoder, c.loss, c.data.binary) == (enc, loss, True)
    from napari_medseg.training.stages import load_train_stages

    for path in sorted((REPO / "configs").glob("*.yaml")):
        for stage in load_train_stages(path):
            assert all(Path(d).parts[:3] == ("..", "shared", "data") for d in stage.config.data.dataset), path


def test_freeze_encoder_keeps_encoder_weights(small_consep, tmp_path):
    from napari_medseg.models import build_model

    cfg = tiny_config(small_consep, tmp_path / "f", "epochs=1", "freeze_encoder=true", "data.val_fraction=0")
    torch.manual_seed(cfg.seed)
    initial = build_model(load_train_config(None, TINY[:3] + ["model.num_classes=5"]).model).state_dict()
    model, _ = load_checkpoint(train(cfg).checkpoint)
    state = model.state_dict()
    enc = [k for k in state if k.startswith("encoder.") and "running" not in k and "num_batches" not in k]
    dec = [k for k in state if k.startswith("decoder.") and k.endswith("weight")]
    assert enc and all(torch.equal(state[k], initial[k]) for k in enc)
    assert any(not torch.equal(state[k], initial[k]) for k in dec)
