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
    assert (tmp_path / "work" / "cmu1-results" / "CMU-1-Small-Region_nuclei.csv").is_file()


def test_a_file_name_given_as_the_image_is_said_so(tiny_checkpoint, consep):
    from napari_medseg.inference import Segmenter
    from napari_medseg.io import ImageReadError

    segmenter = Segmenter.load(tiny_checkpoint, device="cpu")
    path = consep / "images" / "train_19_005.png"
    for given in (str(path), path):
        with pytest.raises(ImageReadError, match=r"takes an image's pixels \(an array\), not a file name .*segment_file"):
            segmenter.segment(given)
