"""``medseg train`` under torchrun: an error every process meets is said once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hostile import medseg

REPO = Path(__file__).resolve().parents[1]
MESSAGE = "epochs must be an integer, got 'abc'"


def test_a_config_error_under_torchrun_is_printed_once(tmp_path):
    """Two processes, a bad --set: the message had been printed by each; now by the first, and
    torchrun reports both processes' status 2."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    if not Path(torchrun).exists():
        pytest.skip("torchrun is not installed")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "napari_medseg", "train",
                           str(REPO / "configs" / "smoke.yaml"), "--set", "epochs=abc"],
                          env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.count(MESSAGE) == 1, proc.stderr
    assert "medseg train: error: " in proc.stderr and "Traceback (most recent call last)" not in proc.stderr.split(
        "medseg train: error")[0]


def test_a_later_rank_is_quiet_before_the_group_and_keeps_the_status(monkeypatch):
    """The second process of a node (LOCAL_RANK 1), before the processes have joined, ended by
    torchrun during its pause (the first said the error and exited): no message, the same status 2."""
    from napari_medseg.cli import entry as cli_main

    def ended_by_torchrun(seconds):
        raise cli_main.Terminated()

    monkeypatch.setattr(cli_main.time, "sleep", ended_by_torchrun)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    proc = medseg("train", str(REPO / "configs" / "smoke.yaml"), "--set", "epochs=abc")
    assert proc.returncode == 2 and proc.stderr == "", proc.stderr
    monkeypatch.setenv("LOCAL_RANK", "0")  # the first process of a second node: says it, naming its rank
    proc = medseg("train", str(REPO / "configs" / "smoke.yaml"), "--set", "epochs=abc")
    assert proc.returncode == 2 and "medseg train (rank 1): error:" in proc.stderr and MESSAGE in proc.stderr


def test_a_later_rank_failing_alone_says_its_error_after_the_pause(monkeypatch):
    """An error only the second process meets (the first waits for it to join): no one ends it in
    its pause, so it says the error itself, naming its rank. It had exited with status 2 and
    nothing on the screen."""
    from napari_medseg.cli import entry as cli_main

    pauses = []
    monkeypatch.setattr(cli_main.time, "sleep", pauses.append)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    proc = medseg("train", str(REPO / "configs" / "smoke.yaml"), "--set", "epochs=abc")
    assert pauses == [cli_main.LINGER_S]
    assert proc.returncode == 2 and "medseg train (rank 1): error:" in proc.stderr and MESSAGE in proc.stderr
    assert proc.stderr.count(MESSAGE) == 1
