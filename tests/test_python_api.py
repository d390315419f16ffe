"""The README's *In Python* example, run as written (from the repository root, where its
``../shared`` paths lead), and what a newcomer's first wrong call gets: a file name given where
the pixels go."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## In Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_python_example_runs_as_written(tmp_path):
    """Run where its ``../shared`` leads to the data, as from the repository's root, in a folder of
    its own (it writes the slide's results beside it)."""
    from conftest import DATA

    (tmp_path / "shared").symlink_to(DATA.parent, target_is_directory=True)
    (tmp_path / "work").mkdir()
    proc = subprocess.run([sys.executable, "-c", _readme_example()], cwd=tmp_path / "work", capture_output=True,
                          text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    classes, count = re.search(r"(\[.*\]) -> (\d+) nuclei", proc.stdout).groups()
    assert classes == "['background', 'other', 'inflammatory', 'epithelial', 'spindle']"
    assert 40 <= int(count) <= 120  # the sample patch: 104 annotated nuclei, 65 found by the default
    found, files = re.search(r"(\d+) nuclei in the region; (\[.*\])", proc.stdout).groups()
    assert 50 <= int(found) <= 200, found  # 512² px of the 20x slide's tissue (the widget's run: about 100)
    assert "CMU-1-Small-Region_nuclei.geojson" in files
    median = float(re.search(r"median area ([\d.]+) µm²", proc.stdout).group(1))
    assert 8 < median < 40, median  # nuclei at 40x: tens of µm², not px
    scores = eval(re.search(r"(\{'nucleus_dice'.*\})", proc.stdout).group(1))
    assert scores["nucleus_dice"] > 0.75 and scores["bpq"] > 0.25, scores  # the default on its sample patch
    assert (tmp_path / "work" / "cmu1-results" / "CMU-1-Small-Region_nuclei.csv").is_file()


def test_a_file_name_given_as_the_image_is_said_so(tiny_checkpoint, consep):
    from napari_medseg.inference import Segmenter
    from napari_medseg.io import ImageReadError

    segmenter = Segmenter.load(tiny_checkpoint, device="cpu")
    path = consep / "images" / "train_19_005.png"
    for given in (str(path), path):
        with pytest.raises(ImageReadError, match=r"takes an image's pixels \(an array\), not a file name .*segment_file"):
            segmenter.segment(given)


def test_wrong_kinds_of_argument_are_refused_by_name_before_the_network_runs(tiny_checkpoint, consep, tmp_path):
    """What scripts pass by mistake (a walkthrough): settings as dicts, a torch tensor, a slide's
    path or a tuple for a region, a fractional region, an unknown nucleus setting, an impossible
    pixel size for areas: each refused by name (they had failed deep inside, one after the
    network had run); a path and a 4-tuple are simply taken."""
    import numpy as np
    import torch

    from conftest import DATA
    from napari_medseg.errors import MedsegError
    from napari_medseg.inference import InferenceSettingsError, Segmenter
    from napari_medseg.inference.regions import Region, RegionError
    from napari_medseg.inference.slide import predict_slide
    from napari_medseg.io import ImageReadError, read_image
    from napari_medseg.nuclei import object_table

    segmenter = Segmenter.load(tiny_checkpoint, device="cpu")
    image = read_image(consep / "images" / "train_19_005.png")[:64, :64]
    ran = []
    with pytest.raises(InferenceSettingsError, match="instance_settings must be of type InstanceSettings"):
        segmenter.segment_nuclei(image, instance_settings={"min_size": 10}, progress=lambda d, t: ran.append(d))
    assert not ran
    with pytest.raises(InferenceSettingsError, match="settings must be of type TileSettings"):
        segmenter.segment(image, settings={"tile_size": 256})
    with pytest.raises(InferenceSettingsError, match="have no 'min_sise'"):
        segmenter.instance_settings_with({"min_sise": 10})
    with pytest.raises(ImageReadError, match=r"tensor.cpu\(\).numpy\(\)"):
        segmenter.segment(torch.from_numpy(image))
    with pytest.raises(ImageReadError, match="one image at a time, got a list of 2"):
        segmenter.segment_nuclei([image, image])
    with pytest.raises(RegionError, match="whole number of level-0 pixels, got 600.5"):
        Region(600.5, 500, 64, 64)
    assert Region(np.int64(600), 500.0, 64, 64) == Region(600, 500, 64, 64)
    with pytest.raises(MedsegError, match="open_slide"):
        predict_slide(segmenter, image, tmp_path / "x")
    slide = DATA / "slides" / "CMU-1-Small-Region.svs"
    result = predict_slide(segmenter, str(slide), tmp_path / "out", region=(900, 900, 64, 64), nuclei=False)
    assert result.region == Region(900, 900, 64, 64)
    with pytest.raises(MedsegError, match=r"^out_dir .* already holds results"):  # not the CLI's --out
        predict_slide(segmenter, slide, tmp_path / "out", region=(900, 900, 64, 64), nuclei=False)
    nuclei = np.zeros((8, 8), np.int32)
    nuclei[2:6, 2:6] = 1
    assert object_table(nuclei, pixel_size_um=0.25)["area_um2"].tolist() == [1.0]
    for bad in (-0.25, float("nan"), 100):
        with pytest.raises(MedsegError, match="Areas in µm² need the side of a pixel in µm"):
            object_table(nuclei, pixel_size_um=bad)
