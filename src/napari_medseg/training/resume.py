"""Resume state without pickle: one ``resume.safetensors`` per run, written atomically each epoch.

Tensors (full-precision weights and buffers, optimizer moments, RNG states) are safetensors
entries; everything else (config, history, optimizer hyper-parameters, scheduler and
early-stopping state, Python and NumPy RNG positions) is JSON in the header. Loading never
executes code.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from ..errors import MedsegError
from ..io.images import atomic_write
from ..models.checkpoint import RESUME_KEY
from ..models.weights import write_safetensors
from .config import TrainConfig
from .ema import STEPS_KEY as EMA_STEPS_KEY

RESUME_VERSION = 1
# Settings that may differ between a run and its resumption (they do not change the result; each
# crop's augmentation has its own seed, so the worker processes that draw it do not either; the
# data decide model.num_classes, and the data's classes are compared on their own).
RESUME_FREE = ("resume", "save_resume", "out_dir", "device", "num_threads", "repeats", "data.num_workers",
               "model.num_classes")


class ResumeError(MedsegError, ValueError):
    """A resume file is missing, not ours, or does not fit this run."""


def _rng_state(loader_generator: torch.Generator) -> tuple[dict, dict]:
    tensors = {"rng.torch": torch.get_rng_state(), "rng.loader": loader_generator.get_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss = random.getstate()
    info = {"numpy": [kind, int(pos), int(has_gauss), float(cached)],
            "python": [version, list(internal), gauss]}
    return tensors, info


def _set_rng_state(tensors: dict, info: dict, loader_generator: torch.Generator) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    loader_generator.set_state(tensors["rng.loader"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])
    kind, pos, has_gauss, cached = info["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = info["python"]
    random.setstate((version, tuple(internal), gauss))


def save_resume(path: Path, model: torch.nn.Module, optimizer, scheduler, loader_generator: torch.Generator,
                info: dict, scaler=None, ema=None) -> Path:
    """``info``: JSON-able run state (epoch, config, history, early-stopping state, ...);
    ``scaler``: float16 training's loss scaler, whose scale and growth count carry over;
    ``ema``: the weights' moving average (``training.ema.WeightAverage``), kept where the run has one."""
    tensors = {f"model.{k}": v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    if ema is not None:
        ema_tensors, info[EMA_STEPS_KEY] = ema.state()
        tensors.update(ema_tensors)
    opt = optimizer.state_dict()
    for idx, entry in opt["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value.detach().to("cpu").contiguous().clone()
            else:
                info.setdefault("optimizer_scalars", {}).setdefault(str(idx), {})[key] = value
    info["optimizer_groups"] = opt["param_groups"]
    info["scheduler"] = scheduler.state_dict() if scheduler is not None else None
    info["grad_scaler"] = scaler.state_dict() if scaler is not None else None
    rng_tensors, rng_info = _rng_state(loader_generator)
    tensors.update(rng_tensors)
    info["rng"] = rng_info
    info["version"] = RESUME_VERSION
    text = json.dumps(info)
    path = Path(path)
    atomic_write(path, lambda tmp: write_safetensors(tensors, tmp, {RESUME_KEY: text}, path))
    return Path(path)


def read_resume(path: str | Path) -> tuple[dict, dict]:
    """(tensors, info) of a resume file, refusing pickles and other files."""
    from safetensors import safe_open

    from ..models.weights import CheckpointError, read_state_dict

    path = Path(path)
    if not path.is_file():
        raise ResumeError(f"Resume file '{path}' does not exist.")
    try:
        tensors = read_state_dict(path)
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
    except CheckpointError as exc:
        raise ResumeError(str(exc)) from exc
    if RESUME_KEY not in header:
        raise ResumeError(f"{path.name} is not a napari-medseg resume file (a best checkpoint cannot be resumed: "
                          "use the resume.safetensors next to it).")
    try:
        info = json.loads(header[RESUME_KEY])
    except ValueError:
        raise ResumeError(f"{path.name}: the resume state in its header is damaged (not JSON).") from None
    if info.get("version") != RESUME_VERSION:
        raise ResumeError(f"{path.name}: resume format {info.get('version')}, this version reads {RESUME_VERSION}.")
    return tensors, info


def config_differences(given: dict, stored: dict, prefix: str = "") -> list[str]:
    """``key: stored -> given`` for every setting that differs, except those in ``RESUME_FREE``."""
    diffs = []
    for key in sorted(set(given) | set(stored)):
        if prefix + key in RESUME_FREE:
            continue
        a, b = given.get(key), stored.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, f"{prefix}{key}.")
        elif (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
            diffs.append(f"{prefix}{key}: {b!r} -> {a!r}")
    return diffs


def _with_defaults(stored: dict, defaults: dict) -> dict:
    """``stored`` with every setting it lacks taken from ``defaults``, nested settings too."""
    out = dict(stored)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = _with_defaults(out[key], value)
    return out


def read_resume_for(path: str | Path, given: dict) -> tuple[dict, dict]:
    """``read_resume``, refusing a file written by a run with other settings than ``given``."""
    tensors, info = read_resume(path)
    # a setting added since the file was written is the setting the run had: its default ("off")
    diffs = config_differences(given, _with_defaults(info["config_given"], TrainConfig().to_dict()))
    if diffs:
        best = Path(path).resolve().parent / "best.safetensors"
        raise ResumeError("The config differs from the run being resumed (" + "; ".join(diffs) + "). "
                          "Resume with the same settings; to train on with other settings (more epochs, "
                          f"another lr), start a new run from its best checkpoint: --set init_checkpoint={best} "
                          "--set out_dir=<a new folder>, without --resume.")
    return tensors, info


def check_same_processes(info: dict, world_size: int, resume: str | Path) -> None:
    """Refuse to resume with another number of processes than the run had (torchrun's world size):
    the epoch's crops are shared out among them, so the steps per epoch, the schedule and the
    optimizer's parameters (DDP freezes those no pass uses) differ; it failed with a traceback
    from the optimizer. Files written before the world size was recorded are not checked."""
    recorded = info.get("world_size")
    if recorded is None or recorded == world_size:
        return
    how = (f"torchrun --nproc_per_node {recorded} -m napari_medseg train CONFIG --resume {resume}" if recorded > 1
           else f"medseg train CONFIG --resume {resume}, without torchrun")
    raise ResumeError(f"The run being resumed was trained by {recorded} process{'es' if recorded > 1 else ''}, "
                      f"this one has {world_size}; resume it with as many ({how}).")


def check_same_data(info: dict, data: dict) -> None:
    """Refuse to resume on other data (``data``: the run's data description)."""
    if info["data"]["val_groups"] != data["val_groups"] or info["data"]["classes"] != data["classes"]:
        raise ResumeError("The data differ from the run being resumed (classes or validation images changed).")


def restore(tensors: dict, info: dict, model: torch.nn.Module, optimizer, scheduler,
            loader_generator: torch.Generator, scaler=None, model_config=None, ema=None) -> None:
    """Put a run's state back; ``model_config``: the model's config, needed for a file written
    before the encoder's unused stages were removed (``_older_parameter_numbers``); ``ema``: the
    run's moving average of the weights, where it keeps one (the file holds it: ``ema_decay`` is
    in the config it was checked against)."""
    from ..models.registry import without_removed

    saved = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    state = without_removed(saved, model)
    model.load_state_dict(state)
    opt_state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = value
    for idx, scalars in info.get("optimizer_scalars", {}).items():
        opt_state.setdefault(int(idx), {}).update(scalars)
    groups = info["optimizer_groups"]
    if len(state) < len(saved):
        numbers = _older_parameter_numbers(model, optimizer, model_config, groups)
        opt_state = {numbers[i]: v for i, v in opt_state.items() if numbers.get(i) is not None}
        groups = [{**g, "params": [numbers[i] for i in g["params"] if numbers.get(i) is not None]} for g in groups]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    if scheduler is not None and info.get("scheduler") is not None:
        scheduler.load_state_dict(info["scheduler"])
    if scaler is not None and info.get("grad_scaler"):  # a file without one: the scaler starts afresh, as it did
        scaler.load_state_dict(info["grad_scaler"])
    if ema is not None:
        if EMA_STEPS_KEY not in info:
            raise ResumeError("The resume file holds no moving average of the weights, which this run's ema_decay "
                              "keeps; resume with the settings it was written with.")
        ema.load_state(tensors, info[EMA_STEPS_KEY])
    _set_rng_state(tensors, info["rng"], loader_generator)


def _older_parameter_numbers(model: torch.nn.Module, optimizer, model_config, groups: list[dict]) -> dict:
    """For a resume file whose network still had the encoder stages its ``encoder_depth`` leaves
    unused (before ``models.registry.remove_unused_encoder_modules``): the optimizer's number of
    each of its parameters now (None for a removed one). They were numbered over the network as
    it was built then; the removed ones never had a gradient, so they have no optimizer state."""
    from ..models.registry import REMOVED_ATTRIBUTE, build_model

    removed = getattr(model, REMOVED_ATTRIBUTE, ())
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    names = {id(p): n for n, p in model.named_parameters()}
    now = {names[id(p)]: number for number, p in enumerate(trained)}
    if model_config is None:
        raise ResumeError("This resume file was written by an earlier napari-medseg, whose network kept unused "
                          "encoder stages; resuming it needs the run's model config.")
    from dataclasses import replace

    older = build_model(replace(model_config, encoder_weights=None), keep_unused=True)
    was_removed = [n for n, _ in older.named_parameters() if any(n.startswith(r + ".") for r in removed)]
    counted = sum(len(g["params"]) for g in groups)
    # the removed parameters were the optimizer's where nothing froze them (no freeze_encoder, no DDP)
    then = [n for n, _ in older.named_parameters() if n in now or (n in was_removed and counted > len(now))]
    if len(then) != counted:
        raise ResumeError(f"The resume file's optimizer holds {counted} parameters; the run's network has "
                          f"{len(now)} to train. Resume with the napari-medseg that wrote it, or start a new run.")
    return {number: now.get(name) for number, name in enumerate(then)}
