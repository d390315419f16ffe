"""A fine-tuned model averaged, weight by weight, with the model it started from.

Fine-tuning the CoNSeP-trained default on all the data gained a lot on the added sets and lost
a little on CoNSeP. Averaging the two models' weights (weight-space ensembling, as in WiSE-FT)
keeps most of both when the fine-tuned model started from the other: they lie in one basin.

Batch-norm running statistics are averaged like the weights by default; they can instead be
measured again on training crops of the data (``batchnorm="measure"``), and the foreground
threshold is the fine-tuned model's unless asked otherwise (``threshold``: ``tuned``,
``start``, ``tune`` on the validation images, or a number). On the all-data fine-tune both
alternatives measured worse on CoNSeP (docs/default_model_history.md), hence the defaults.

    medseg average START TUNED --weight 0.3 --out averaged.safetensors
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..errors import MedsegError
from ..models import load_checkpoint, save_checkpoint
from .config import BATCHNORM, BN_CROPS, TrainConfig
from .data import PatchDataset, normalization_stats
from .mixed import sampling_weights
from .setup import WeightedEpochSampler, prepare_data
from .threshold import retune_threshold





class AverageError(MedsegError, ValueError):
    """The two checkpoints cannot be averaged (other networks, other classes) or the data does not fit."""


@dataclass
class Averaged:
    path: Path
    weight: float
    bn_crops: int  # crops the batch-norm statistics were measured on (0: averaged like the weights)
    threshold: float | None  # the foreground threshold written
    tuning: dict | None = None  # the re-tuning's result (``retune_threshold``), when tuned


def interpolate(start: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], weight: float) -> dict:
    """``(1 - weight) * start + weight * tuned`` for every floating-point tensor; counters (batch
    norm's ``num_batches_tracked``) from ``tuned``."""
    if start.keys() != tuned.keys():
        missing = sorted(start.keys() ^ tuned.keys())[:3]
        raise AverageError(f"The two models have different layers (e.g. {', '.join(missing)}): only a model and "
                           "one fine-tuned from it can be averaged.")
    mixed = {}
    for name, value in tuned.items():
        if value.shape != start[name].shape:
            raise AverageError(f"Layer '{name}' has shape {tuple(start[name].shape)} in one model and "
                               f"{tuple(value.shape)} in the other.")
        if value.is_floating_point():
            mixed[name] = torch.lerp(start[name].float(), value.float(), weight).to(value.dtype)
        else:
            mixed[name] = value.clone()
    return mixed


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, batches, device: torch.device) -> int:
    """Measure every batch-norm layer's running mean and variance again over ``batches`` (a
    cumulative average, not a moving one: torch's ``update_bn``); returns the images seen."""
    seen = []

    def counted():
        for batch in batches:
            seen.append(batch[0].shape[0])
            yield batch

    torch.optim.swa_utils.update_bn(counted(), model, device)
    return sum(seen)


def training_crops(cfg: TrainConfig, data, mean, std, crops: int) -> DataLoader:
    """``crops`` unaugmented training crops, drawn as the run drew them (by set weight)."""
    dataset = PatchDataset(data.train_items, cfg.data.crop_size, cfg.data.crops_per_image, None,
                           index=data.index, mean=mean, std=std)
    generator = torch.Generator().manual_seed(cfg.seed)
    if data.mixed:
        sampler = WeightedEpochSampler(sampling_weights(data.train_items, dataset.index, cfg.data.datasets),
                                       crops, cfg.seed)
    else:
        sampler = torch.utils.data.RandomSampler(dataset, num_samples=crops, generator=generator)
    return DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, generator=generator)


def average_checkpoints(start_path: str | Path, tuned_path: str | Path, weight: float, out: str | Path,
                        cfg: TrainConfig | None = None, batchnorm: str = "average", threshold: str = "tuned",
                        crops: int = BN_CROPS, device: str = "cpu",
                        recorded_as: tuple[str, str] | None = None) -> Averaged:
    """Write ``out``: ``tuned`` averaged with ``start`` (``weight`` on ``tuned``). ``cfg`` (the
    fine-tuning's config) is needed to measure batch norm on its training crops or tune the
    threshold on its validation images (the split ``tuned`` was trained with: checked).
    ``recorded_as``: the names the record gives the two (what a user typed, e.g. 'default',
    rather than where this machine installed it); default: the paths."""
    if not 0.0 <= weight <= 1.0:
        raise AverageError(f"--weight {weight}: the share of the fine-tuned model must lie between 0 and 1.")
    if batchnorm not in BATCHNORM:
        raise AverageError(f"batch norm '{batchnorm}': choose one of {', '.join(BATCHNORM)}.")
    fixed = _threshold_value(threshold)
    if Path(start_path).resolve() == Path(tuned_path).resolve():  # 'medseg average default default' had copied it
        raise AverageError(f"{start_path} is both models: average a fine-tuned model with the one it started from.")
    out = Path(out)
    if out.exists():
        raise AverageError(f"{out} exists; choose a new file (nothing is overwritten).")
    needs_data = batchnorm == "measure" or threshold == "tune"
    if needs_data and cfg is None:
        raise AverageError("Measuring batch norm or tuning the threshold needs the fine-tuning's config (--config).")
    dev = torch.device(device)
    start, start_meta = load_checkpoint(start_path, dev)
    tuned, tuned_meta = load_checkpoint(tuned_path, dev)
    if not start_meta.model.same_network(tuned_meta.model) or start_meta.classes != tuned_meta.classes:
        raise AverageError(f"{start_path} ({start_meta.model.network_name}, {len(start_meta.classes)} classes) and "
                           f"{tuned_path} ({tuned_meta.model.network_name}, {len(tuned_meta.classes)} classes) are "
                           "different networks.")
    data = _checked_data(cfg, tuned_meta, tuned_path) if needs_data else None
    tuned.load_state_dict(interpolate(start.state_dict(), tuned.state_dict(), weight))
    seen = 0
    if batchnorm == "measure":
        mean, std = normalization_stats(tuned_meta.normalization)
        seen = recompute_batchnorm(tuned, training_crops(cfg, data, mean, std, crops), dev)
    chosen = {"tuned": tuned_meta.foreground_threshold, "start": start_meta.foreground_threshold}.get(threshold, fixed)
    start_name, tuned_name = recorded_as or (str(start_path), str(tuned_path))
    meta = dataclasses.replace(
        tuned_meta, foreground_threshold=chosen,
        training={**tuned_meta.training, "averaged": {
            "start": start_name, "tuned": tuned_name, "weight_on_tuned": weight, "batchnorm": batchnorm,
            "batchnorm_crops": seen, "threshold": threshold}})
    partial = out.with_name(f".{out.stem}.partial{out.suffix}")  # renamed once complete
    try:
        save_checkpoint(partial, tuned, meta, half=True)
        tuning = retune_threshold(partial, data.val_items, device) if threshold == "tune" else None
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    return Averaged(out, weight, seen, tuning["threshold"] if tuning else chosen, tuning)


def _threshold_value(threshold: str) -> float | None:
    """A number given as the threshold, else None for the named choices; refuses anything else."""
    if threshold in ("tuned", "start", "tune"):
        return None
    try:
        value = float(threshold)
    except ValueError:
        raise AverageError(f"threshold '{threshold}': give tuned, start, tune or a number between 0 and 1.") from None
    if not 0.0 < value < 1.0:
        raise AverageError(f"threshold {value}: a foreground threshold lies between 0 and 1.")
    return value


def _checked_data(cfg: TrainConfig, tuned_meta, tuned_path):
    """The config's data, whose validation images must be those ``tuned`` was trained with."""
    data = prepare_data(cfg, None, None)
    val_groups = sorted({it.group for it in data.val_items})
    recorded = tuned_meta.data.get("val_groups")
    if recorded is not None and sorted(recorded) != val_groups:
        raise AverageError(f"The config's validation images are not those {tuned_path} was trained with "
                           f"(its split: {len(recorded)} source images, the config's: {len(val_groups)}); "
                           "use the config (and --set overrides) of that run.")
    return data
