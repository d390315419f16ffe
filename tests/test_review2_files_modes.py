"""Files the user gets have the mode any new file of theirs has (the umask's), not a temp's 0600."""

from __future__ import annotations

import os
import stat

import pytest
import torch

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_a_resume_file_gets_the_umask_mode(tmp_path, mask):
    from napari_medseg.training.resume import save_resume

    model = torch.nn.Conv2d(3, 2, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = os.umask(mask)
    try:
        path = save_resume(tmp_path / "last.resume.safetensors", model, optimizer, None, torch.Generator(), {})
    finally:
        os.umask(before)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask  # was 0600 (safetensors' own)


def test_a_label_map_and_a_csv_get_the_umask_mode(tmp_path, consep):
    import numpy as np

    from napari_medseg.io.images import read_label_map, write_label_map
    from napari_medseg.io.tables import write_csv

    labels = read_label_map(consep / "labels" / "train_1_005.tif")
    written = write_label_map(tmp_path / "labels.tif", labels, pixel_size_um=0.25)
    table = write_csv(tmp_path / "t.csv", {"class": ["a"], "n": [int(np.max(labels))]})
    for path in (written, table):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left behind
