"""Helpers of the hostile-input suite (tests/test_hostile_*.py): run ``medseg`` as installed, and
check that a refusal is a message (no traceback) and that no file was written or lost."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest


def medseg(*args, process: bool = False, timeout: float = 600) -> subprocess.CompletedProcess:
    """``medseg ARGS``: through the CLI's ``main`` in this process (its exit status and printed
    output; an exception escaping ``main`` is what a user would see as a traceback), or, with
    ``process``, in a fresh process (``python -m napari_medseg``, the installed package)."""
    argv = [str(a) for a in args]
    if process:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, "-m", "napari_medseg", *argv], env=env,
                              capture_output=True, text=True, timeout=timeout)
    from napari_medseg.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # as the interpreter ends on it: the message on stderr, status 1
            code = exc.code if isinstance(exc.code, int) else 1
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
        except Exception:  # a bug: the user would see this traceback
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess(["medseg", *argv], code, out.getvalue(), err.getvalue())


def tree(*roots: Path) -> dict[str, str]:
    """Every file under ``roots`` (hidden ones too) -> its SHA-256: compare before and after."""
    out = {}
    for root in roots:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
        for path in files:
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def assert_refused(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """A non-zero exit with a one-message error (no traceback) that contains every fragment."""
    err = proc.stderr
    assert proc.returncode not in (0, None), f"exit 0 for a hostile input:\n{proc.stdout}\n{err}"
    assert "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in:\n{err}"
    return err


def no_temp_files(*roots: Path) -> list[Path]:
    """Hidden temp files (``.<name>.<pid>.<hex>.part``) left under ``roots``."""
    return [p for root in roots if Path(root).exists() for p in Path(root).rglob(".*.part")]


def tiny_dataset(root: Path, classes=("background", "nucleus"), stems=("a_0", "a_1", "b_0"), size: int = 32) -> Path:
    """A dataset folder of tiny random images with one square nucleus each."""
    from PIL import Image
    import tifffile

    rng = np.random.default_rng(0)
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for stem in stems:
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / "images" / f"{stem}.png")
        labels = np.zeros((size, size), np.uint8)
        labels[8:16, 8:16] = 1
        tifffile.imwrite(root / "labels" / f"{stem}.tif", labels)
    (root / "classes.json").write_text(json.dumps({"classes": list(classes)}))
    return root


def tiny_model(path: Path, classes=("background", "nucleus"), **meta_changes) -> Path:
    """An untrained, very small vanilla U-Net checkpoint."""
    import torch

    from napari_medseg.models import CheckpointMeta, ModelConfig, build_model, save_checkpoint

    torch.manual_seed(0)
    cfg = ModelConfig("vanilla_unet", num_classes=len(classes), base_channels=4, depth=2)
    meta = CheckpointMeta(model=cfg, classes=list(classes), **meta_changes)
    return save_checkpoint(path, build_model(cfg).eval(), meta)


def rewrite_checkpoint(source: Path, target: Path, meta_change=None, tensor_change=None) -> Path:
    """A copy of a checkpoint with its metadata JSON (``meta_change(dict)``) or tensors
    (``tensor_change(dict)``) edited in place, as a hostile user would."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(source), framework="pt") as fh:
        header = dict(fh.metadata())
    tensors = load_file(str(source))
    if meta_change is not None:
        meta = json.loads(header["napari_medseg"])
        meta_change(meta)
        header["napari_medseg"] = json.dumps(meta)
    if tensor_change is not None:
        tensor_change(tensors)
    save_file(tensors, str(target), metadata=header)
    return target


# The fixtures every hostile-input module uses (imported there by name, so pytest finds them).
@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("model") / "tiny.safetensors")


@pytest.fixture
def dataset(tmp_path):
    return tiny_dataset(tmp_path / "data")
