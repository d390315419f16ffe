"""An image and its label files dragged in from a dataset's folders get names that say which is which."""

from __future__ import annotations

PLUGIN = "napari-medseg"


def test_label_files_of_one_stem_are_named_by_their_folder(make_napari_viewer, consep):
    viewer = make_napari_viewer()
    for sub, ext in (("images", ".png"), ("labels", ".tif"), ("instances", ".tif")):
        viewer.open(consep / sub / f"train_1_005{ext}", plugin=PLUGIN)
    # were 'train_1_005', 'train_1_005 [1]', 'train_1_005 [2]': which is the class map?
    assert [layer.name for layer in viewer.layers] == ["train_1_005", "train_1_005 labels", "train_1_005 instances"]
    assert [layer.metadata["medseg"]["kind"] for layer in viewer.layers[1:]] == ["classes", "instances"]


def test_a_label_file_whose_name_says_what_it_is_keeps_it(make_napari_viewer, tmp_path, consep):
    import shutil

    (tmp_path / "masks").mkdir()
    shutil.copy(consep / "instances" / "train_1_005.tif", tmp_path / "masks" / "train_1_005_instances.tif")
    viewer = make_napari_viewer()
    (layer,) = viewer.open(tmp_path / "masks" / "train_1_005_instances.tif", plugin=PLUGIN)
    assert layer.name == "train_1_005_instances"
