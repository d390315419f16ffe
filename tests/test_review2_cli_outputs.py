"""What ``medseg predict`` leaves in its output folder when a write fails, and what it records there."""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest

from hostile import assert_refused, medseg, no_temp_files

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_probability_file_that_cannot_be_reserved_leaves_no_folder(tmp_path, tiny_checkpoint, consep, monkeypatch):
    """A full disk at ``--probabilities``' reservation: the message names the file, and neither
    OUT/probabilities/ nor OUT (made for it) is left behind, empty (they had been)."""
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    out = tmp_path / "new" / "out"
    proc = medseg("predict", consep / "images" / "train_2_006.png", "--model", tiny_checkpoint, "--out", out,
                  "--device", "cpu", "--tile", "128", "--overlap", "32", "--probabilities")
    assert_refused(proc, f"Cannot write {out / 'probabilities' / 'train_2_006.npy'}: No space left on device")
    assert not (tmp_path / "new").exists(), sorted(tmp_path.rglob("*"))


def test_a_failed_reservation_in_a_folder_with_results_keeps_them(tmp_path, tiny_checkpoint, consep, monkeypatch):
    """The same failure where an earlier run wrote results: they stay, and only the empty folder
    this run made goes."""
    image = consep / "images" / "train_2_006.png"
    out = tmp_path / "out"
    args = ("predict", image, "--model", tiny_checkpoint, "--out", out, "--device", "cpu", "--tile", "128",
            "--overlap", "32")
    assert medseg(*args).returncode == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    assert_refused(medseg(*args, "--probabilities"), "No space left on device")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before and no_temp_files(out) == []
