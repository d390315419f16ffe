"""Validation during training on images of any size: a dataset folder's images of several sizes,
and images smaller than the network's stride."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from napari_medseg.io import read_image, read_label_map
from napari_medseg.io.images import write_label_map
from napari_medseg.training import load_train_config, train
from napari_medseg.training.data import LabelledImage, PatchDataset

TINY = ["model.architecture=unet", "model.encoder=resnet18", "model.encoder_depth=3", "data.crop_size=64",
        "batch_size=4", "lr=0.003", "num_threads=1"]


def tiny_config(dataset, out_dir, *extra):
    return load_train_config(None, [*TINY, f"data.dataset=[{dataset}]", f"out_dir={out_dir}", *extra])


def crop_sample(folder, stem, rows: slice, cols: slice) -> None:
    """Crop one sample of a dataset folder (image, labels and instances) in place."""
    Image.fromarray(read_image(folder / "images" / f"{stem}.png")[rows, cols]).save(folder / "images" / f"{stem}.png")
    for sub in ("labels", "instances"):
        path = folder / sub / f"{stem}.tif"
        write_label_map(path, read_label_map(path)[rows, cols])


@pytest.mark.usefixtures("one_torch_thread")
def test_validation_images_of_several_sizes_train(small_consep, tmp_path):
    # every source image holds a 256x256 and a 200x160 patch: the validation images differ in size
    for i in (1, 2, 3):
        crop_sample(small_consep, f"train_{i}_006", slice(0, 200), slice(0, 160))
    result = train(tiny_config(small_consep, tmp_path / "run", "epochs=1", "data.val_fraction=0.34"))
    record = result.history[0]
    assert np.isfinite(record["val_loss"]) and 0.0 <= record["nucleus_dice"] <= 1.0
    assert result.checkpoint.is_file()


def _item(h, w, name="x"):
    return LabelledImage(name, name, np.zeros((h, w, 3), np.float32), np.zeros((h, w), np.uint8))


def test_validation_batches_hold_images_of_one_padded_size():
    from napari_medseg.training.setup import padded_shape, same_size_batches

    items = [_item(256, 256), _item(200, 160), _item(256, 256), _item(250, 251), _item(200, 160), _item(256, 256)]
    # ordered by padded size as the trainer orders them: 200x160 (x2), then 256x256 (x3 with the 250x251)
    items = sorted(items, key=lambda it: padded_shape(it.labels.shape, 8))
    batches = same_size_batches(items, 8, batch_size=2)
    assert sorted(i for b in batches for i in b) == list(range(len(items)))  # every image once, in order
    assert [i for b in batches for i in b] == list(range(len(items)))
    ds = PatchDataset(items, None, multiple_of=8)
    for batch in batches:
        assert 1 <= len(batch) <= 2
        assert len({ds[i][0].shape for i in batch}) == 1  # one tensor per batch
@pytest.mark.parametrize("size", [(16, 16), (1, 5), (3, 40)])
def test_validation_pads_images_smaller_than_the_stride(size):
    h, w = size
    rng = np.random.default_rng(0)
    item = LabelledImage("s", "s", rng.random((h, w, 3), dtype=np.float32), np.ones((h, w), np.uint8))
    image, labels = PatchDataset([item], None, multiple_of=32)[0]
    assert image.shape == (3, -(-h // 32) * 32, -(-w // 32) * 32) and labels.shape == image.shape[1:]
    assert torch.equal(image[:, :h, :w], torch.from_numpy(item.image).permute(2, 0, 1))  # the image itself kept
    assert (labels[:h, :w] == 1).all() and (labels[h:] == -100).all() and (labels[:, w:] == -100).all()
    # padding mirrors the image (as "reflect" where the image is large enough to mirror)
    assert set(np.unique(image.numpy())) <= set(np.unique(item.image))


def test_validation_padding_is_reflect_where_it_can_be():
    rng = np.random.default_rng(1)
    item = LabelledImage("s", "s", rng.random((50, 45, 3), dtype=np.float32), np.ones((50, 45), np.uint8))
    image, _ = PatchDataset([item], None, multiple_of=32)[0]
    expected = torch.nn.functional.pad(torch.from_numpy(item.image).permute(2, 0, 1), (0, 19, 0, 14), mode="reflect")
    assert torch.equal(image, expected)


@pytest.mark.usefixtures("one_torch_thread")
def test_images_smaller_than_the_stride_train_and_validate(small_consep, tmp_path):
    for path in (small_consep / "images").glob("*.png"):
        crop_sample(small_consep, path.stem, slice(100, 116), slice(100, 116))
    result = train(tiny_config(small_consep, tmp_path / "run", "epochs=1", "data.val_fraction=0.34",
                               "model.encoder_depth=5"))
    assert np.isfinite(result.history[0]["val_loss"]) and result.checkpoint.is_file()
