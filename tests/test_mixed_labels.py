"""Mixed label sets: CoNSeP (classes), MoNuSeg and TNBC (nucleus / background only) in one run,
on small crops of the real sets with tiny models."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from napari_medseg.models import read_meta
from napari_medseg.training import TrainConfig, TrainConfigError, load_train_config, train
from napari_medseg.training.data import DISTANCE_IGNORE, PatchDataset, distance_target
from napari_medseg.training.losses import MixedLabels, WithDistanceHead, build_loss, nucleus_logits
from napari_medseg.training.mixed import (BINARY_BACKGROUND, BINARY_NUCLEUS, MIN_SOLIDITY, load_mixed_sets,
                                          split_each_set)
from napari_medseg.training.progress import Progress, monitor_value
from napari_medseg.training.setup import WeightedEpochSampler

from conftest import DATA

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CROP = 128
SETS = {  # folder: stems of two or more source images (slides / TCGA cases)
    "consep_train": ["train_1_005", "train_1_006", "train_2_005", "train_2_006", "train_3_005"],
    "monuseg_train": ["TCGA-21-5784-01Z-00-DX1", "TCGA-50-5931-01Z-00-DX1", "TCGA-A7-A13E-01Z-00-DX1"],
    "tnbc_train": ["tnbc_01_1", "tnbc_01_2", "tnbc_02_1", "tnbc_03_1"],
}


def _write_crops(name: str, out: Path) -> Path:
    """A dataset folder of CROP x CROP crops (from each image's centre) of the real set ``name``."""
    src, dst = DATA / name, out / name
    for sub in ("images", "labels", "instances"):
        (dst / sub).mkdir(parents=True)
    for stem in SETS[name]:
        image = np.asarray(Image.open(src / "images" / f"{stem}.png").convert("RGB"))
        y, x = (image.shape[0] - CROP) // 2, (image.shape[1] - CROP) // 2
        cut = (slice(y, y + CROP), slice(x, x + CROP))
        Image.fromarray(image[cut]).save(dst / "images" / f"{stem}.png")
        for sub in ("labels", "instances"):
            tifffile.imwrite(dst / sub / f"{stem}.tif", tifffile.imread(src / sub / f"{stem}.tif")[cut])
    shutil.copy(src / "classes.json", dst / "classes.json")
    return dst


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    if not all((DATA / name).is_dir() for name in SETS):
        pytest.skip("the real data sets are not in ../shared/data")
    out = tmp_path_factory.mktemp("mixed")
    return {name: _write_crops(name, out) for name in SETS}


def _datasets(sets, tnbc_distance="convex", weights=(1.0, 1.0, 1.0)) -> list[dict]:
    return [{"path": str(sets["consep_train"]), "labels": "classes", "weight": weights[0]},
            {"path": str(sets["monuseg_train"]), "labels": "binary", "weight": weights[1]},
            {"path": str(sets["tnbc_train"]), "labels": "binary", "weight": weights[2], "distance": tnbc_distance}]


def test_datasets_are_typed_checked_settings_and_old_configs_still_load(sets, tmp_path):
    cfg = TrainConfig.from_dict({"data": {"datasets": _datasets(sets)}})
    assert [(d.labels, d.weight, d.distance) for d in cfg.data.datasets] == [
        ("classes", 1.0, "all"), ("binary", 1.0, "all"), ("binary", 1.0, "convex")]
    assert TrainConfig.from_dict(cfg.to_dict()).data.datasets == cfg.data.datasets  # as a checkpoint stores it
    old = load_train_config(None, [f"data.dataset=[{sets['consep_train']}]"])
    assert old.data.datasets == [] and old.dataset_specs()[0].path == str(sets["consep_train"])
    bad = [({"labels": "nuclei"}, "labels must be classes or binary"),
           ({"weight": 0}, "weight must be above 0"),
           ({"weight": "heavy"}, "weight must be a number"),
           ({"distance": "some"}, "distance must be one of all, convex, none"),
           ({"colour": "red"}, "Unknown data.datasets[1] setting(s): colour")]
    for change, message in bad:
        with pytest.raises(TrainConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            TrainConfig.from_dict({"data": {"datasets": [{"path": "x", **change}]}})
    with pytest.raises(TrainConfigError, match="data.dataset and data.datasets are both set"):
        TrainConfig.from_dict({"data": {"dataset": ["a"], "datasets": ["b"]}})


def test_binary_sets_become_codes_and_split_per_set_by_source_image(sets):
    cfg = TrainConfig.from_dict({"data": {"datasets": _datasets(sets)}})
    items, classes = load_mixed_sets(cfg.data.datasets, cfg.data.group_pattern)
    assert classes == ["background", "other", "inflammatory", "epithelial", "spindle"]  # the class set's
    by_set = {name: [it for it in items if it.dataset == name] for name in SETS}
    for it in by_set["monuseg_train"] + by_set["tnbc_train"]:
        truth = tifffile.imread(DATA / it.dataset / "labels" / f"{it.name}.tif")
        centre = (truth.shape[0] - CROP) // 2, (truth.shape[1] - CROP) // 2
        truth = truth[centre[0]:centre[0] + CROP, centre[1]:centre[1] + CROP]
        assert it.binary and set(np.unique(it.labels)) <= {BINARY_BACKGROUND, BINARY_NUCLEUS}
        np.testing.assert_array_equal(it.labels == BINARY_NUCLEUS, truth > 0)
    assert {it.group for it in by_set["tnbc_train"]} == {"tnbc_train/tnbc_01", "tnbc_train/tnbc_02",
                                                         "tnbc_train/tnbc_03"}
    train_items, val_items = split_each_set(items, 0.34, seed=0)
    for name in SETS:  # every set holds out whole source images of its own
        held = {it.group for it in val_items if it.dataset == name}
        kept = {it.group for it in train_items if it.dataset == name}
        assert held and kept and not held & kept


def _real_logits(sets, name: str, classes: int = 5):
    """Tiny-model logits (class channels + distance) of four real crops of ``name``, and their targets."""
    from napari_medseg.models import ModelConfig, build_model

    cfg = TrainConfig.from_dict({"data": {"datasets": _datasets(sets)}})
    items, _ = load_mixed_sets(cfg.data.datasets, cfg.data.group_pattern)
    chosen = [it for it in items if it.dataset == name][:4]
    ds = PatchDataset(chosen, 64, 1, None, distance_targets=True)
    torch.manual_seed(0)
    image, labels, distance = (torch.stack(t) for t in zip(*(ds[i] for i in range(len(chosen)))))
    model = build_model(ModelConfig("unet", "resnet18", num_classes=classes, encoder_depth=3, distance_head=True))
    with torch.no_grad():
        logits = model(image)
    return logits, labels, distance


def _split_gradients(loss_fn, logits, labels, distance):
    """Gradients of the loss on (background logit, log-sum-exp of the nucleus logits, the split
    between nucleus classes): the class logits rebuilt as ``s + log_softmax(r)``, so ``r``
    moves only the split and ``s`` only the summed nucleus probability."""
    l0 = logits[:, :1].clone().requires_grad_()
    s = torch.logsumexp(logits[:, 1:5], 1, keepdim=True).clone().requires_grad_()
    r = logits[:, 1:5].clone().requires_grad_()
    rebuilt = torch.cat([l0, s + torch.log_softmax(r, 1), logits[:, 5:]], 1)
    loss_fn(rebuilt, labels, distance).backward()
    return l0.grad, s.grad, r.grad


def test_binary_pixels_train_the_summed_nucleus_probability_never_the_class_split(sets):
    logits, labels, distance = _real_logits(sets, "monuseg_train")
    assert set(labels.unique().tolist()) <= {BINARY_BACKGROUND, BINARY_NUCLEUS, -100}
    probs = torch.softmax(logits[:, :5], 1)
    two = torch.softmax(nucleus_logits(logits[:, :5]), 1)  # (p(background), the summed nucleus probabilities)
    torch.testing.assert_close(two[:, 1], probs[:, 1:].sum(1))
    for name in ("ce_dice", "bce", "focal", "log_cosh_dice"):
        loss_fn = WithDistanceHead(MixedLabels(build_loss(name, num_classes=5), build_loss(name, num_classes=2)), 5)
        g0, gs, gr = _split_gradients(loss_fn, logits, labels, distance)
        assert gs.abs().max() > 1e-6 and g0.abs().max() > 1e-6, name  # nucleus vs background trains
        assert gr.abs().max() < 1e-5 * gs.abs().max(), name  # the split gets nothing (float32 rounding)

    # a CoNSeP batch does train the split, through the same loss
    logits, labels, distance = _real_logits(sets, "consep_train")
    loss_fn = WithDistanceHead(MixedLabels(build_loss("ce_dice", num_classes=5), build_loss("ce_dice", num_classes=2)), 5)
    assert _split_gradients(loss_fn, logits, labels, distance)[2].abs().max() > 1e-5


def test_tnbc_distance_is_trusted_only_on_convex_components(sets):
    cfg = TrainConfig.from_dict({"data": {"datasets": _datasets(sets, "convex")}})
    items, _ = load_mixed_sets(cfg.data.datasets, cfg.data.group_pattern)
    from skimage.measure import regionprops

    ignored = kept = 0
    for it in (it for it in items if it.dataset == "tnbc_train"):
        target = distance_target(it)
        for region in regionprops(it.instances):
            inside = target[tuple(region.coords.T)]
            if region.solidity < MIN_SOLIDITY:
                assert (inside == DISTANCE_IGNORE).all()
                ignored += 1
            else:
                assert (inside > 0).any() and (inside >= 0).all()
                kept += 1
        assert (target[it.instances == 0] == 0).all()  # background is trusted: distance 0
    assert ignored >= 1 and kept > 5 * ignored  # (crops cut some nuclei at their edges: a few more low)

    # ignored pixels give the distance channel no gradient; trusted ones do
    logits, labels, distance = _real_logits(sets, "tnbc_train")
    logits.requires_grad_()
    loss_fn = WithDistanceHead(MixedLabels(build_loss("ce", num_classes=5), build_loss("ce", num_classes=2)), 5)
    loss_fn(logits, labels, distance).backward()
    grad = logits.grad[:, 5]
    assert (grad[distance == DISTANCE_IGNORE] == 0).all() and (distance == DISTANCE_IGNORE).any()
    assert grad[distance >= 0].abs().max() > 0


def test_a_binary_set_without_instance_maps_gets_its_nuclei_cut_from_its_mask(sets, tmp_path):
    """Nucleus masks alone (a lab's commonest layout, `labels: binary`): the background's code had
    been cut as one nucleus, the whole image, so the distance target was one blob and the set's
    validation bPQ read 0. Now the nuclei come from the mask's nucleus pixels."""
    from napari_medseg.training.data import item_instances

    masks_only = tmp_path / "masks_only"
    shutil.copytree(sets["monuseg_train"], masks_only)
    shutil.rmtree(masks_only / "instances")
    spec = [{"path": str(masks_only), "labels": "binary"}]
    [item, *_] = load_mixed_sets(TrainConfig.from_dict({"data": {"datasets": spec}}).data.datasets, r"^(.*)$")[0]
    nuclei = item_instances(item)
    mask = item.labels == BINARY_NUCLEUS
    assert nuclei.max() > 10  # a MoNuSeg crop's many nuclei, not one blob
    # on the mask, covering it (a few annotated holes filled, as the watershed's clean-up does)
    assert (nuclei[~mask] > 0).mean() < 0.01 and (nuclei[mask] > 0).mean() > 0.95
    target = distance_target(item)
    assert (target[~mask] > 0).mean() < 0.01 and target[mask].max() == 1.0


def test_sets_are_drawn_in_proportion_to_their_weights():
    # 100 crops of set a, 10 of b, 1 of c, weighted 2 : 1 : 1
    from napari_medseg.training.data import LabelledImage
    from napari_medseg.training.config import DatasetSpec
    from napari_medseg.training.mixed import sampling_weights

    blank = np.zeros((4, 4, 3), np.float32), np.zeros((4, 4), np.uint8)
    items = [LabelledImage(f"{s}{i}", f"{s}{i}", *blank, dataset=s) for s, n in (("a", 100), ("b", 10), ("c", 1))
             for i in range(n)]
    specs = [DatasetSpec("x/a", weight=2.0), DatasetSpec("x/b"), DatasetSpec("x/c")]
    sampler = WeightedEpochSampler(sampling_weights(items, list(range(len(items))), specs), 8000, seed=0)
    drawn = [items[i].dataset for i in sampler]
    shares = {s: drawn.count(s) / len(drawn) for s in "abc"}
    assert shares == pytest.approx({"a": 0.5, "b": 0.25, "c": 0.25}, abs=0.02)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first and len(first) == 8000
    sampler.set_epoch(0)
    assert list(sampler) == first  # seeded per epoch: a resumed run draws the same crops


def test_a_mixed_run_reports_each_set_and_tunes_its_threshold(sets, tmp_path):
    cfg = TrainConfig.from_dict({"model": {"architecture": "unet", "encoder": "resnet18", "encoder_depth": 3,
                                           "distance_head": True},
                                 "data": {"datasets": _datasets(sets, weights=(2.0, 1.0, 1.0)), "crop_size": 64,
                                          "crops_per_image": 2, "val_fraction": 0.34},
                                 "batch_size": 4, "lr": 0.003, "epochs": 2, "num_threads": 1, "monitor": "val_bpq",
                                 "out_dir": str(tmp_path / "run"), "save_resume": False, "tune_threshold": True})
    result = train(cfg)
    for record in result.history:
        per_set = record["sets"]
        assert set(per_set) == set(SETS)
        assert {"miou", "mean_dice", "per_class_iou"} <= set(per_set["consep_train"])
        for name in ("monuseg_train", "tnbc_train"):  # nucleus vs background only
            assert set(per_set[name]) == {"loss", "nucleus_dice", "pixel_accuracy", "bpq"}
        for key in ("nucleus_dice", "bpq"):
            values = [per_set[name][key] for name in SETS if np.isfinite(per_set[name][key])]
            assert record[key] == pytest.approx(np.mean(values))
        assert record["val_loss"] == pytest.approx(np.mean([per_set[name]["loss"] for name in SETS]))
        assert record["miou"] == pytest.approx(per_set["consep_train"]["miou"])
        finite = [per_set[name]["bpq"] for name in SETS if np.isfinite(per_set[name]["bpq"])]
        if finite:  # the weakest set's figure, as the worst-set monitor reads a real record
            assert monitor_value("val_worst_set_bpq", record["val_loss"], record) == min(finite)
    meta = read_meta(result.checkpoint)
    assert meta.classes == ["background", "other", "inflammatory", "epithelial", "spindle"]
    assert [d["labels"] for d in meta.data["datasets"]] == ["classes", "binary", "binary"]
    assert set(meta.data["val_images_per_set"]) == set(SETS)
    tuning = meta.metrics["threshold_tuning"]
    assert meta.foreground_threshold == tuning["threshold"] and 0.1 <= tuning["threshold"] <= 0.9
    assert tuning["images"] == meta.data["val_images"] and set(tuning["groups"]) == set(meta.data["val_groups"])


def test_the_worst_set_monitor_keeps_the_epoch_whose_weakest_set_is_best():
    """A mean over sets lets a big gain on one set hide a loss on another (the all-data run's
    CoNSeP); ``val_worst_set_bpq`` keeps the epoch whose weakest set scores highest."""
    def epoch(n, consep, tnbc):
        sets = {"consep_train": {"bpq": consep, "nucleus_dice": 0.7}, "tnbc_train": {"bpq": tnbc, "nucleus_dice": 0.8}}
        return {"epoch": n, "val_loss": 0.5}, {"bpq": (consep + tnbc) / 2, "nucleus_dice": 0.75, "sets": sets}

    epochs = [epoch(1, 0.28, 0.53), epoch(2, 0.31, 0.47), epoch(3, 0.30, 0.50)]
    for monitor, best in (("val_bpq", 1), ("val_worst_set_bpq", 2)):
        cfg = TrainConfig.from_dict({"monitor": monitor})
        progress = Progress.start(cfg, has_validation=True)
        for record, metrics in epochs:
            progress.add_epoch(dict(record), metrics)
        assert progress.best_epoch == best, monitor
    single = {"bpq": 0.4}  # one validation set: its own figure
    assert monitor_value("val_worst_set_bpq", 0.5, single) == 0.4
    with pytest.raises(TrainConfigError, match="monitor 'val_worst_bpq'"):
        TrainConfig.from_dict({"monitor": "val_worst_bpq"})
