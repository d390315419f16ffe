"""The distance head: its training target, its loss, its growth from a checkpoint without one,
and the instances it seeds, on real CoNSeP patches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_medseg.evaluation.report import PairEvaluation
from napari_medseg.nuclei.watershed import InstanceInputError, InstanceSettings, semantic_to_instances
from napari_medseg.nuclei.distance import nucleus_distance_map
from napari_medseg.io.dataset import open_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CLASSES = ["background", "other", "inflammatory", "epithelial", "spindle"]
STEMS = ["train_1_005", "train_3_006", "train_12_003", "train_19_005", "train_22_007", "train_25_012"]


@pytest.fixture(scope="module")
def samples(consep):
    folder = open_dataset(consep, require_labels=True)
    return [folder.load(s) for s in STEMS]


def reference_distance_map(instances: np.ndarray) -> np.ndarray:
    """Slow and obvious: one whole-image distance transform per nucleus."""
    from scipy import ndimage as ndi

    out = np.zeros(instances.shape, np.float64)
    for i in np.unique(instances[instances > 0]):
        inside = instances == i
        d = ndi.distance_transform_edt(np.pad(inside, 1))[1:-1, 1:-1]
        out[inside] = d[inside] / d.max()
    return out


def test_distance_map_matches_reference_on_real_instances(samples):
    for s in samples:
        fast = nucleus_distance_map(s.instances)
        assert fast.dtype == np.float32 and fast.shape == s.instances.shape
        np.testing.assert_allclose(fast, reference_distance_map(s.instances), atol=1e-6)
        inside = s.instances > 0
        assert (fast[~inside] == 0).all() and (fast[inside] > 0).all() and fast.max() == 1.0
        # every nucleus reaches exactly 1 at its centre
        tops = np.zeros(s.instances.max() + 1)
        np.maximum.at(tops, s.instances[inside], fast[inside])
        assert np.allclose(tops[np.unique(s.instances[inside])], 1.0)


def test_distance_map_separates_touching_nuclei():
    two = np.zeros((12, 20), np.int32)
    two[2:10, 2:10], two[2:10, 10:18] = 1, 2  # two squares sharing an edge
    d = nucleus_distance_map(two)
    assert d[5, 9] < 0.3 and d[5, 10] < 0.3  # the shared edge is low on both sides
    instances = semantic_to_instances((two > 0).astype(np.uint8), InstanceSettings(min_size=1), distance=d)
    assert instances.max() == 2 and len(np.unique(instances[two == 1])) == 1


def test_instances_from_true_distance_maps_recover_the_ground_truth(samples):
    """Seeded by a perfect distance map, the watershed gives back the annotated nuclei (upper
    bound of the distance head); the class map's own distance transform cannot."""
    with_map, without = PairEvaluation(CLASSES), PairEvaluation(CLASSES)
    for s in samples:
        d = nucleus_distance_map(s.instances)
        with_map.add(s.stem, s.labels, s.labels, s.instances, semantic_to_instances(s.labels, None, d))
        without.add(s.stem, s.labels, s.labels, s.instances, semantic_to_instances(s.labels))
    seeded, plain = with_map.report()["overall"], without.report()["overall"]
    assert seeded["bpq"] > 0.95 and seeded["aji"] > 0.95, seeded
    assert seeded["bpq"] > plain["bpq"] + 0.1, (seeded["bpq"], plain["bpq"])


def test_distance_map_shape_must_match(samples):
    s = samples[0]
    with pytest.raises(InstanceInputError, match="distance map"):
        semantic_to_instances(s.labels, None, np.zeros((10, 10), np.float32))


def test_distance_loss_is_class_loss_plus_bce_on_valid_pixels():
    from napari_medseg.training.losses import IGNORE_INDEX, WithDistanceHead, build_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 6, 16, 16)
    labels = torch.randint(0, 5, (2, 16, 16))
    labels[:, :3] = IGNORE_INDEX
    distance = torch.rand(2, 16, 16)
    ce = build_loss("ce", num_classes=5)
    loss = WithDistanceHead(ce, 5, weight=0.5)(logits, labels, distance)
    keep = labels != IGNORE_INDEX
    z, t = logits[:, 5][keep], distance[keep]
    bce = -(t * torch.log(torch.sigmoid(z)) + (1 - t) * torch.log(1 - torch.sigmoid(z))).mean()
    assert torch.allclose(loss, ce(logits[:, :5], labels) + 0.5 * bce, atol=1e-5)
    with pytest.raises(ValueError, match="distance targets"):
        WithDistanceHead(ce, 5)(logits, labels)


def _slow_gradient_error(predicted: np.ndarray, target: np.ndarray, keep: np.ndarray) -> float:
    """The reference: scipy's Sobel per image (edges repeated), pixel by pixel over the mask."""
    from scipy import ndimage as ndi

    total, count = 0.0, 0
    for p, t, k in zip(predicted, target, keep):
        grads = [(ndi.sobel(a, axis=1, mode="nearest") / 8, ndi.sobel(a, axis=0, mode="nearest") / 8) for a in (p, t)]
        h, w = t.shape
        for y in range(h):
            for x in range(w):
                window = k[max(0, y - 1):y + 2, max(0, x - 1):x + 2]
                if t[y, x] > 0 and window.all():
                    total += sum((grads[0][i][y, x] - grads[1][i][y, x]) ** 2 for i in (0, 1))
                    count += 1
    return total / count


def test_distance_gradient_error_matches_a_slow_reference_on_real_nuclei(samples):
    """HoVer-Net's MSGE on the distance map: 0 for a perfect prediction, the per-pixel reference's
    value otherwise, over nucleus pixels whose neighbourhood is trusted (an untrusted instance,
    DISTANCE_IGNORE, and its rim do not count)."""
    from napari_medseg.training.data import DISTANCE_IGNORE
    from napari_medseg.training.losses import distance_gradient_error

    target = np.stack([nucleus_distance_map(s.instances[:64, :64]) for s in samples[:2]])
    target[1, 40:64, 40:64][target[1, 40:64, 40:64] > 0] = DISTANCE_IGNORE  # nuclei there are not trusted
    keep = target >= 0
    rng = np.random.default_rng(0)
    predicted = np.clip(target + rng.normal(0, 0.1, target.shape), 0, 1).astype(np.float32)
    t, k = torch.from_numpy(target), torch.from_numpy(keep)
    assert float(distance_gradient_error(t.clamp(min=0), t, k)) == pytest.approx(0.0, abs=1e-12)
    fast = float(distance_gradient_error(torch.from_numpy(predicted), t, k))
    assert fast == pytest.approx(_slow_gradient_error(predicted, target, keep), rel=1e-5)
    # a prediction that differs only on the untrusted nuclei scores the same
    changed = predicted.copy()
    changed[1][target[1] < 0] = 0.9
    assert float(distance_gradient_error(torch.from_numpy(changed), t, k)) == pytest.approx(fast, rel=1e-6)
    flat = float(distance_gradient_error(torch.zeros_like(t), t, k))
    assert flat > fast > 0  # noise costs less than no slope at all


def test_distance_loss_adds_the_weighted_gradient_error_and_trains_through_it():
    from napari_medseg.training.losses import IGNORE_INDEX, WithDistanceHead, build_loss, distance_gradient_error

    torch.manual_seed(0)
    logits = torch.randn(2, 6, 16, 16, requires_grad=True)
    labels = torch.randint(0, 5, (2, 16, 16))
    labels[:, :3] = IGNORE_INDEX
    distance = torch.rand(2, 16, 16)
    ce = build_loss("ce", num_classes=5)
    plain = WithDistanceHead(ce, 5, weight=0.5)(logits, labels, distance)
    loss = WithDistanceHead(ce, 5, weight=0.5, gradient_weight=4.0)(logits, labels, distance)
    expected = plain + 4.0 * distance_gradient_error(torch.sigmoid(logits[:, 5]), distance, labels != IGNORE_INDEX)
    assert torch.allclose(loss, expected, atol=1e-6) and loss > plain
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[:, 5].abs().sum() > 0


def test_patch_dataset_moves_distance_with_labels(samples):
    from napari_medseg.io.images import to_rgb_float
    from napari_medseg.training.config import AugmentConfig
    from napari_medseg.training.data import LabelledImage, PatchDataset

    items = [LabelledImage(s.stem, s.stem, to_rgb_float(s.image, 3), s.labels, s.instances) for s in samples[:3]]
    items.append(LabelledImage("painted", "painted", items[0].image, samples[0].labels, None))  # no instance map
    torch.manual_seed(0)
    ds = PatchDataset(items, 96, 4, AugmentConfig(scale=(0.8, 1.25)), distance_targets=True)
    nucleus_px = positive_px = 0
    for i in range(len(ds)):
        image, labels, distance = ds[i]
        assert image.shape == (3, 96, 96) and labels.shape == distance.shape == (96, 96)
        ignored = labels == -100
        assert (distance[ignored] == -100).all() and (distance[~ignored] >= 0).all() and (distance[~ignored] <= 1).all()
        assert (distance[labels == 0] == 0).all()  # background is never a nucleus core
        nucleus_px += int((labels > 0).sum())
        positive_px += int((distance[labels > 0] > 0).sum())
    assert nucleus_px > 1000 and positive_px == nucleus_px  # labels and distance moved together
    val = PatchDataset(items[:1], None, distance_targets=True, multiple_of=32)
    _, labels, distance = val[0]
    np.testing.assert_array_equal(distance.numpy(), nucleus_distance_map(samples[0].instances))


def test_one_batch_overfits_with_distance_head(samples):
    """The head learns: a few steps on one real batch lower both parts of the loss."""
    from napari_medseg.io.images import to_rgb_float
    from napari_medseg.models import ModelConfig, build_model
    from napari_medseg.training.losses import WithDistanceHead, build_loss

    torch.manual_seed(0)
    model = build_model(ModelConfig("unet", "resnet18", num_classes=5, encoder_depth=3, distance_head=True))
    x = torch.stack([torch.from_numpy(to_rgb_float(s.image, 3)[:64, :64]).permute(2, 0, 1) for s in samples[:4]])
    y = torch.stack([torch.from_numpy(s.labels[:64, :64].astype(np.int64)) for s in samples[:4]])
    d = torch.stack([torch.from_numpy(nucleus_distance_map(s.instances)[:64, :64]) for s in samples[:4]])
    loss_fn = WithDistanceHead(build_loss("ce", num_classes=5), 5)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    model.train()

    def mse():
        with torch.no_grad():
            return float(((torch.sigmoid(model(x)[:, 5]) - d) ** 2).mean())

    first = mse()
    for _ in range(25):
        opt.zero_grad()
        loss_fn(model(x), y, d).backward()
        opt.step()
    assert mse() < 0.5 * first, (first, mse())


def test_growing_head_keeps_the_class_channels(tiny_checkpoint):
    from napari_medseg.models import build_model, load_checkpoint
    from napari_medseg.training.trainer import load_growing_head

    start, meta = load_checkpoint(tiny_checkpoint)
    meta.model.distance_head = True
    grown = build_model(meta.model)
    load_growing_head(grown, start.state_dict())
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a, b = start.eval()(x), grown.eval()(x)
    assert b.shape[1] == 6 and torch.equal(a, b[:, :5])
    other = build_model(type(meta.model)("unet", "resnet34", num_classes=5, encoder_depth=3))
    with pytest.raises(RuntimeError):
        load_growing_head(other, start.state_dict())


def test_fine_tune_adds_distance_head_and_predicts_nuclei(tiny_checkpoint, small_consep, tmp_path):
    """init_checkpoint without a head + model.distance_head: the run trains it and the checkpoint
    predicts classes, a distance map in [0, 1] and instances through every entry point."""
    from napari_medseg.cli import main
    from napari_medseg.inference import Segmenter, TileSettings
    from napari_medseg.io.images import read_label_map
    from napari_medseg.training.config import TrainConfig
    from napari_medseg.training.trainer import train

    cfg = TrainConfig.from_dict({
        "init_checkpoint": str(tiny_checkpoint), "model": {"distance_head": True},
        "data": {"dataset": [str(small_consep)], "crop_size": 64, "val_fraction": 0.34},
        "epochs": 2, "batch_size": 4, "num_threads": 1, "out_dir": str(tmp_path / "run"), "save_resume": False,
        "monitor": "val_bpq",
    })
    done = train(cfg)
    assert all(np.isfinite(r["train_loss"]) and np.isfinite(r["val_loss"]) for r in done.history)
    assert all(0 <= r["bpq"] <= 1 for r in done.history)
    assert done.history[done.best_epoch - 1]["bpq"] == max(r["bpq"] for r in done.history)
    seg = Segmenter.load(tmp_path / "run" / "best.safetensors", device="cpu")
    assert seg.has_distance_head and seg.classes == CLASSES
    image = open_dataset(small_consep).load("train_1_005").image
    settings = TileSettings(128, 32, 4, skip_background=False)
    distance = np.full(image.shape[:2], -1, np.float32)
    probs = np.zeros((5, *image.shape[:2]), np.float32)
    labels = seg.segment(image, settings, probabilities_out=probs, distance_out=distance)
    assert labels.max() < 5 and np.allclose(probs.sum(0), 1, atol=1e-4)
    assert (distance >= 0).all() and (distance <= 1).all()
    np.testing.assert_array_equal(labels, probs.argmax(0))
    classes, instances = seg.segment_nuclei(image, settings)
    np.testing.assert_array_equal(classes, labels)
    np.testing.assert_array_equal(instances, semantic_to_instances(labels, None, distance))
    # the CLI writes the same instances
    out = tmp_path / "pred"
    assert main(["predict", str(small_consep / "images" / "train_1_005.png"), "--model",
                 str(tmp_path / "run" / "best.safetensors"), "--out", str(out), "--device", "cpu",
                 "--tile", "128", "--overlap", "32", "--batch-size", "4", "--no-skip-background",
                 "--backend", "torch"]) == 0  # compared with PyTorch's instances to the pixel
    np.testing.assert_array_equal(read_label_map(out / "instances" / "train_1_005.tif"), instances)


def test_validation_bpq_matches_the_evaluation_of_the_same_nuclei(samples):
    """validate()'s bPQ on padded validation images equals PairEvaluation's on the same output."""
    from napari_medseg.io.images import to_rgb_float
    from napari_medseg.training.data import LabelledImage, PatchDataset
    from napari_medseg.training.losses import WithDistanceHead, build_loss
    from napari_medseg.training.trainer import validate
    from torch.utils.data import DataLoader

    crop = (slice(0, 250), slice(3, 253))  # not a multiple of 32: validation pads, bPQ must not see the padding
    items = [LabelledImage(s.stem, s.stem, to_rgb_float(s.image, 3)[crop], s.labels[crop], s.instances[crop])
             for s in samples]
    # an 'output' per image: the labels one-hot (slightly wrong) and the true distance map as logits
    outputs = []
    for it in items:
        labels = np.where(np.roll(it.labels, 2, axis=1) > 0, it.labels.max(initial=1), 0)  # shifted, one class
        onehot = np.eye(5, dtype=np.float32)[labels].transpose(2, 0, 1) * 10
        d = np.clip(nucleus_distance_map(it.instances), 1e-4, 1 - 1e-4)
        logits = np.concatenate([onehot, np.log(d / (1 - d))[None]])
        outputs.append(np.pad(logits, ((0, 0), (0, 6), (0, 6))))  # padded to 256 like the images

    class Replay(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.k = 0

        def forward(self, x):
            out = torch.from_numpy(np.stack(outputs[self.k:self.k + len(x)]))
            self.k += len(x)
            return out

    loader = DataLoader(PatchDataset(items, None, multiple_of=32, distance_targets=True), batch_size=4)
    loss_fn = WithDistanceHead(build_loss("ce", num_classes=5), 5)
    scores = []
    # the defaults, and a model's own recorded settings (a fine-tune validates with its start's)
    for settings in (None, InstanceSettings(marker_threshold=0.7, min_size=150, min_marker_size=30)):
        _, metrics = validate(Replay(), loader, loss_fn, 5, torch.device("cpu"),
                              gt_instances=[it.instances for it in items], instance_settings=settings)
        evaluation = PairEvaluation(CLASSES)
        for it, out in zip(items, outputs):
            h, w = it.labels.shape
            pred = out[:5, :h, :w].argmax(0)
            found = semantic_to_instances(pred, settings, 1 / (1 + np.exp(-out[5, :h, :w])))
            evaluation.add(it.name, it.labels, pred, it.instances, found)
        expected = evaluation.report()["overall"]["bpq"]
        assert 0.3 < expected < 0.99 and metrics["bpq"] == pytest.approx(expected, abs=1e-9)
        scores.append(expected)
    assert scores[0] != scores[1]  # the settings were used


def test_bpq_monitor_without_validation_nuclei_says_why(consep, tmp_path):
    """Validation images without a single nucleus leave bPQ undefined: a clear error, not a run
    that never saves."""
    from napari_medseg.io.images import to_rgb_float
    from napari_medseg.training.config import TrainConfig
    from napari_medseg.training.data import LabelledImage, split_by_group
    from napari_medseg.training.trainer import TrainingError, train

    folder = open_dataset(consep, require_labels=True)
    with_nuclei, empty = folder.load("train_1_005"), folder.load("train_4_010")  # the second has no nucleus
    items = [LabelledImage(s.stem, g, to_rgb_float(s.image, 3), s.labels, s.instances)
             for s, g in ((with_nuclei, "a"), (empty, "b"))]
    seed = next(k for k in range(20) if [it.group for it in split_by_group(items, 0.5, k)[1]] == ["b"])
    cfg = TrainConfig.from_dict({
        "model": {"architecture": "unet", "encoder": "resnet18", "encoder_depth": 3},
        "data": {"crop_size": 64, "val_fraction": 0.5, "split_seed": seed}, "epochs": 1, "batch_size": 2,
        "num_threads": 1, "out_dir": str(tmp_path / "run"), "save_resume": False, "monitor": "val_bpq",
    })
    with pytest.raises(TrainingError, match="no nucleus"):
        train(cfg, items=(items, CLASSES))


def test_nuclei_step_reports_progress_and_can_be_cancelled_before_the_watershed(real_512, monkeypatch):
    """segment_nuclei reports the tiles and then the watershed's whole-image steps on one scale;
    a cancel seen after the first of those steps stops before the watershed runs."""
    import skimage.segmentation

    from napari_medseg.steps import Cancelled
    from napari_medseg.inference import Segmenter, TileSettings
    from napari_medseg.nuclei.watershed import INSTANCE_STEPS

    seg = Segmenter.load("default", device="cpu")
    settings = TileSettings(256, 64, 4, skip_background=False)
    seen = []
    labels, instances = seg.segment_nuclei(real_512, settings, progress=lambda d, t: seen.append((d, t)))
    tiles = seg.last_report.tiles
    assert {t for _, t in seen} == {tiles + INSTANCE_STEPS}
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert [d for d, _ in seen][-INSTANCE_STEPS:] == [tiles + k for k in range(1, INSTANCE_STEPS + 1)]
    assert instances.max() > 10 and (instances > 0).sum() > 0.95 * (labels > 0).sum()  # nuclei cover the foreground

    calls = []
    real_watershed = skimage.segmentation.watershed
    monkeypatch.setattr(skimage.segmentation, "watershed", lambda *a, **k: calls.append(1) or real_watershed(*a, **k))
    seen.clear()
    with pytest.raises(Cancelled):
        seg.segment_nuclei(real_512, settings, progress=lambda d, t: seen.append((d, t)),
                           should_cancel=lambda: bool(seen) and seen[-1][0] > tiles)
    assert seen[-1][0] == tiles + 1 and not calls


def test_an_annotation_without_instances_keeps_its_small_nuclei_as_targets(samples):
    """Labels without an instance map (painted in the viewer) give their nuclei by the watershed;
    a small painted nucleus stays one (the prediction's noise floor is not applied to annotations)."""
    from scipy import ndimage as ndi

    from napari_medseg.training.data import ANNOTATION_MIN_SIZE, LabelledImage, item_instances

    s = samples[0]
    labels = s.labels.astype(np.uint8).copy()
    # a 4 x 5 px nucleus painted on background with 3 px of background all round
    clear = ndi.binary_erosion(labels == 0, np.ones((11, 11), bool))
    y, x = (int(v[len(v) // 2]) for v in np.nonzero(clear))
    labels[y:y + 4, x:x + 5] = 1
    assert ANNOTATION_MIN_SIZE <= 20 < InstanceSettings().min_size
    item = LabelledImage("painted", "painted", s.image.astype(np.float32) / 255, labels)
    derived = item_instances(item)
    painted = derived[y:y + 4, x:x + 5]
    assert painted.min() > 0 and len(np.unique(painted)) == 1  # kept, as one nucleus
    assert (derived == painted[0, 0]).sum() == 20  # and on its own
    annotated = len(np.unique(s.instances)) - 1
    assert len(np.unique(derived)) - 1 >= 0.8 * annotated  # the annotated nuclei are there too


def _slow_touching_pixels(instances: np.ndarray, radius: int) -> np.ndarray:
    """Slow and obvious: a nucleus pixel touches when its (2r+1)² window holds another nucleus."""
    h, w = instances.shape
    out = np.zeros(instances.shape, bool)
    for y, x in zip(*np.nonzero(instances)):
        window = instances[max(0, y - radius):y + radius + 1, max(0, x - radius):x + radius + 1]
        out[y, x] = bool(((window > 0) & (window != instances[y, x])).any())
    return out


def test_touching_pixels_match_a_slow_reference_on_real_nuclei(samples):
    from napari_medseg.nuclei.distance import TOUCH_RADIUS_PX, touching_pixels

    total = touching = 0
    for s in samples[:3]:
        fast = touching_pixels(s.instances)
        np.testing.assert_array_equal(fast, _slow_touching_pixels(s.instances, TOUCH_RADIUS_PX))
        total, touching = total + int((s.instances > 0).sum()), touching + int(fast.sum())
    assert 0.02 < touching / total < 0.5  # CoNSeP's nuclei crowd: some, not most, pixels are necks
    two = np.zeros((12, 20), np.uint16)
    two[2:10, 2:10], two[2:10, 10:18] = 1, 2  # two squares sharing an edge, and a lone one
    lone = np.zeros((12, 12), bool)
    lone[2:10, 2:10] = True
    t = touching_pixels(two, radius=1)
    assert t[2:10, 9:11].all() and not t[2:10, 2:9].any() and not t[2:10, 11:18].any()
    assert not touching_pixels(lone).any()  # one nucleus touches nothing (a bool mask is one id)


def test_touch_weights_weigh_the_distance_loss_where_nuclei_touch():
    from napari_medseg.training.losses import IGNORE_INDEX, WithDistanceHead, build_loss

    torch.manual_seed(0)
    logits, labels = torch.randn(2, 6, 16, 16), torch.randint(0, 5, (2, 16, 16))
    labels[:, :3] = IGNORE_INDEX
    distance, weight = torch.rand(2, 16, 16), torch.ones(2, 16, 16)
    weight[:, 8:10] = 5.0
    ce = build_loss("ce", num_classes=5)
    loss = WithDistanceHead(ce, 5, weight=0.5)(logits, labels, distance, weight)
    keep = labels != IGNORE_INDEX
    z, t, w = logits[:, 5][keep], distance[keep], weight[keep]
    bce = -(w * (t * torch.log(torch.sigmoid(z)) + (1 - t) * torch.log(1 - torch.sigmoid(z)))).mean()
    assert torch.allclose(loss, ce(logits[:, :5], labels) + 0.5 * bce, atol=1e-5)
    plain = WithDistanceHead(ce, 5, weight=0.5)(logits, labels, distance, torch.ones(2, 16, 16))
    assert torch.allclose(plain, WithDistanceHead(ce, 5, weight=0.5)(logits, labels, distance), atol=1e-6)


def test_patch_dataset_moves_touch_weights_with_the_distance(samples):
    from napari_medseg.io.images import to_rgb_float
    from napari_medseg.nuclei.distance import touching_pixels
    from napari_medseg.training.config import AugmentConfig
    from napari_medseg.training.data import LabelledImage, PatchDataset

    items = [LabelledImage(s.stem, s.stem, to_rgb_float(s.image, 3), s.labels, s.instances) for s in samples[:3]]
    torch.manual_seed(0)
    ds = PatchDataset(items, 96, 4, AugmentConfig(scale=(0.8, 1.25)), distance_targets=True, touch_weight=4.0)
    heavy = 0
    for i in range(len(ds)):
        image, labels, distance, weight = ds[i]
        ignored = labels == -100
        assert set(torch.unique(weight[~ignored]).tolist()) <= {1.0, 4.0} and (weight[ignored] == -100).all()
        assert (weight[labels == 0] == 1).all()  # only nucleus pixels weigh more
        heavy += int((weight == 4).sum())
    assert heavy > 100
    val = PatchDataset(items[:1], None, distance_targets=True, multiple_of=32, touch_weight=4.0)
    _, _, _, weight = val[0]
    np.testing.assert_array_equal(weight.numpy() == 4.0, touching_pixels(samples[0].instances))
    assert len(PatchDataset(items[:1], None, distance_targets=True, multiple_of=32)[0]) == 3  # off: no weights


@pytest.mark.parametrize("value, head, message", [
    (0, True, "above 0"), ("5", True, "distance_touch_weight must be a number"), (True, True, "distance_touch_weight must be a number"),
    (5.0, False, "model.distance_head is false"),
])
def test_a_touch_weight_that_cannot_work_is_refused(value, head, message):
    from napari_medseg.training.config import TrainConfig, TrainConfigError

    cfg = TrainConfig()
    cfg.model.distance_head, cfg.distance_touch_weight = head, value
    with pytest.raises(TrainConfigError, match=message):
        cfg.check()
