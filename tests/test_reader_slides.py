"""The napari reader through napari's own machinery: whole slides as multiscale images with
their pixel size as the scale, label TIFFs as Labels layers, plain images as images."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tifffile
from napari.layers import Image, Labels

from conftest import DATA

PLUGIN = "napari-medseg"
SLIDES = DATA / "slides"
CONSEP_CLASSES = ["background", "other", "inflammatory", "epithelial", "spindle"]


def test_ndpi_opens_as_a_lazy_multiscale_image_in_micrometres(make_napari_viewer):
    import dask.array as da

    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(SLIDES / "test3-DAPI-2-(387).ndpi"), plugin=PLUGIN)
    assert isinstance(layer, Image) and layer.multiscale and layer.rgb
    assert [tuple(level.shape) for level in layer.data] == [(4864, 3968, 3), (2432, 1984, 3), (1216, 992, 3), (608, 496, 3)]
    assert all(isinstance(level, da.Array) for level in layer.data)
    assert tuple(layer.scale) == pytest.approx((10_000 / 43826,) * 2)
    assert [str(unit) for unit in layer.units] == ["micrometer", "micrometer"]  # the scale bar reads µm
    info = layer.metadata["slide"]
    assert info["vendor"] == "hamamatsu" and info["pixel_size_um"] == pytest.approx(0.22818, abs=1e-4)


def test_svs_opens_with_aperio_mpp_as_scale(make_napari_viewer):
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(SLIDES / "CMU-1-Small-Region.svs"), plugin=PLUGIN)
    assert isinstance(layer, Image) and layer.rgb and layer.data.shape == (2967, 2220, 3)
    assert tuple(layer.scale) == pytest.approx((0.499, 0.499))
    assert layer.metadata["slide"]["vendor"] == "aperio"


def test_label_tiffs_open_as_labels(make_napari_viewer, consep, tmp_path):
    viewer = make_napari_viewer()
    (truth,) = viewer.open(str(consep / "labels" / "train_1_005.tif"), plugin=PLUGIN)
    assert isinstance(truth, Labels) and truth.metadata["medseg"]["classes"] == CONSEP_CLASSES  # from classes.json
    (inst,) = viewer.open(str(consep / "instances" / "train_1_005.tif"), plugin=PLUGIN)
    assert isinstance(inst, Labels) and inst.metadata["medseg"]["kind"] == "instances" and inst.data.max() > 10

    # outside a dataset: by name, or as an integer map with few values
    shutil.copy(consep / "instances" / "train_1_005.tif", tmp_path / "mine_instances.tif")
    (named,) = viewer.open(str(tmp_path / "mine_instances.tif"), plugin=PLUGIN)
    assert isinstance(named, Labels) and named.metadata["medseg"]["kind"] == "instances"
    tifffile.imwrite(tmp_path / "annotation.tif", (np.arange(64 * 64).reshape(64, 64) % 3).astype(np.uint8))
    (few,) = viewer.open(str(tmp_path / "annotation.tif"), plugin=PLUGIN)
    assert isinstance(few, Labels) and few.metadata["medseg"]["classes"] == ["background", "class 1", "class 2"]
    (image,) = viewer.open(str(consep / "images" / "train_1_005.png"), plugin=PLUGIN)
    assert isinstance(image, Image) and image.rgb
    gray = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "gray.tif", gray)
    (gray_layer,) = viewer.open(str(tmp_path / "gray.tif"), plugin=PLUGIN)
    assert isinstance(gray_layer, Image)


def test_label_pyramids_open_as_multiscale_labels(make_napari_viewer, tmp_path):
    """As ``medseg predict SLIDE`` writes them: ``<slide>_labels.ome.tif`` / ``_instances.ome.tif``."""
    labels = (np.arange(1024 * 1024).reshape(1024, 1024) // 5000 % 4).astype(np.uint8)
    for name in ("slide_labels.ome.tif", "slide_instances.ome.tif"):
        with tifffile.TiffWriter(tmp_path / name, ome=True) as tw:
            tw.write(labels, subifds=1, tile=(256, 256), metadata={"axes": "YX", "PhysicalSizeX": 0.5,
                                                                    "PhysicalSizeXUnit": "µm"})
            tw.write(labels[::2, ::2], subfiletype=1, tile=(256, 256))
    viewer = make_napari_viewer()
    (classes,) = viewer.open(str(tmp_path / "slide_labels.ome.tif"), plugin=PLUGIN)
    assert isinstance(classes, Labels) and classes.multiscale and tuple(classes.scale) == (0.5, 0.5)
    assert classes.metadata["medseg"]["classes"] == ["background", "class 1", "class 2", "class 3"]
    (instances,) = viewer.open(str(tmp_path / "slide_instances.ome.tif"), plugin=PLUGIN)
    assert isinstance(instances, Labels) and instances.metadata["medseg"]["kind"] == "instances"


def test_a_slide_runs_class_pyramid_reopens_with_its_models_classes(make_napari_viewer, tmp_path):
    """A rare class whose few pixels vanish from the coarse levels is still named and coloured:
    the run records its model's classes in the OME-TIFF (the reader had numbered ids up to the
    coarsest level's highest, leaving the rest transparent)."""
    from napari_medseg.io.slide_outputs import (create_result_store, iter_build_pyramid, iter_write_pyramid_tiff,
                                                recorded_classes)
    from napari_medseg.steps import run_steps

    record = {"classes": ["background", "other", "inflammatory", "epithelial", "spindle"],
              "colors": [[0, 0, 0], [255, 0, 255], [0, 200, 0], [255, 128, 0], [0, 200, 200]]}
    store = create_result_store(tmp_path / "slide.zarr", (2048, 2048), {"classes": "uint8"}, 512, 0.5, record)
    classes = np.zeros((2048, 2048), np.uint8)
    classes[100:900, 100:900] = 3
    classes[1501, 1501] = 1  # one pixel of the rare class: gone from every coarser level
    store["classes/0"][:] = classes
    run_steps(iter_build_pyramid(store["classes"], pixel_size_um=0.5))
    path = tmp_path / "slide_labels.ome.tif"
    run_steps(iter_write_pyramid_tiff(path, store["classes"], 0.5, classes=record))
    assert recorded_classes(path) == record and dict(store.attrs)["napari-medseg"] == record
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(path), plugin=PLUGIN)
    assert isinstance(layer, Labels) and layer.multiscale and int(np.asarray(layer.data[-1]).max()) == 3
    assert layer.metadata["medseg"]["classes"] == record["classes"]
    assert layer.colormap.map(1)[3] > 0  # the rare class is drawn, not transparent
