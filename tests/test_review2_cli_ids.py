"""Nucleus ids as a user counts them: 1..N on an image (the largest id is the count), and the
exports that key on them agreeing with the map."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import tifffile

from hostile import medseg
from napari_medseg.io import read_image
from napari_medseg.io.images import read_label_record
from napari_medseg.nuclei.measure import object_table
from napari_medseg.nuclei.watershed import InstanceSettings, semantic_to_instances

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MONUSEG_IMAGE = "TCGA-21-5784-01Z-00-DX1"


def test_predicted_nucleus_ids_run_from_1_to_the_count(monuseg, tmp_path):
    """The default model on a 256² MoNuSeg crop: ids 1..N (the old watershed dropped small seeds
    and left their ids unused: max id 34 for 32 nuclei here, 407 for 397 on the whole image), and
    the class record and object table of the written map are keyed by those ids."""
    crop = read_image(monuseg / "images" / f"{MONUSEG_IMAGE}.png")[:256, :256]
    source = tmp_path / "crop.png"
    from PIL import Image

    Image.fromarray(crop).save(source)
    out = tmp_path / "out"
    proc = medseg("predict", source, "--model", "default", "--out", out, "--device", "cpu", "--backend", "torch")
    assert proc.returncode == 0, proc.stderr
    instances = tifffile.imread(out / "instances" / "crop.tif")
    labels = tifffile.imread(out / "labels" / "crop.tif")
    ids = np.unique(instances[instances > 0])
    assert len(ids) > 20  # real nuclei
    assert ids.tolist() == list(range(1, len(ids) + 1)), (instances.max(), len(ids))
    table = object_table(instances, labels)
    assert table["label"].tolist() == ids.tolist()
    record = read_label_record(out / "instances" / "crop.tif")
    if record is not None and record.get("instance_classes") is not None:
        assert len(record["instance_classes"]) == len(ids) + 1


def test_class_map_ids_are_consecutive_with_and_without_a_distance_map(monuseg):
    """``semantic_to_instances`` on a real class map (the ground truth's) with a distance map whose
    small cores are dropped, and from the distance transform alone: ids 1..N either way."""
    labels = tifffile.imread(monuseg / "labels" / f"{MONUSEG_IMAGE}.tif")[:300, :300]
    from scipy import ndimage as ndi

    distance = ndi.distance_transform_edt(labels > 0)
    distance = (distance / max(distance.max(), 1)).astype(np.float32)
    for found in (semantic_to_instances(labels, InstanceSettings(min_marker_size=30), distance),
                  semantic_to_instances(labels, InstanceSettings())):
        ids = np.unique(found[found > 0])
        assert len(ids) > 20 and ids.tolist() == list(range(1, len(ids) + 1)), (found.max(), len(ids))


def test_a_slide_regions_ids_csv_and_geojson_agree(tmp_path):
    """A slide region (cut block by block): ids 1..N over the region, one CSV row and one GeoJSON
    feature per id (ids there stay unique across blocks, numbered in block order)."""
    import json
    from pathlib import Path

    import zarr

    slide = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
    out = tmp_path / "out"
    proc = medseg("predict", slide, "--region", "800,800,256,256", "--model", "default", "--out", out,
                  "--device", "cpu", "--backend", "torch")
    assert proc.returncode == 0, proc.stderr
    store = zarr.open_group(str(out / "CMU-1-Small-Region.zarr"), mode="r")
    instances = np.asarray(store["instances/0"][800:1056, 800:1056])
    ids = np.unique(instances[instances > 0])
    assert len(ids) > 20 and ids.tolist() == list(range(1, len(ids) + 1))
    with open(out / "CMU-1-Small-Region_nuclei.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(int(r["label"]) for r in rows) == ids.tolist()
    features = json.loads((out / "CMU-1-Small-Region_nuclei.geojson").read_text())["features"]
    assert sorted(f["properties"]["label"] for f in features) == ids.tolist()
