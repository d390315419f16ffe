"""The files a run writes: ``best.safetensors`` (the project's checkpoint format) and
``resume.safetensors`` (see resume.py), both atomically, only on rank 0, into a folder checked
for write access and free space before training starts."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import MedsegError
from ..io.outputs import remove_stale_temps, temp_path
from ..models.checkpoint import CheckpointMeta, save_checkpoint
from .config import AVERAGED_NAME, BEST_NAME, TrainConfig
from .distributed import DistContext, parameter_hash
from .events import TrainingError
from .progress import Progress


def check_fresh_run(out_dirs: list[Path]) -> None:
    """Refuses to train into a folder that holds an earlier run's best checkpoint (also a
    repeated run's, under ``seed_<n>/``): a new run would replace it without a word."""
    for out_dir in out_dirs:
        earlier = sorted(out_dir.glob("best.safetensors")) + sorted(out_dir.glob("seed_*/best.safetensors"))
        if earlier:
            raise TrainingError(
                f"{out_dir} already holds a trained model ({earlier[0]}). Choose another out_dir "
                f"(--set out_dir=...), continue that run with --resume {out_dir / 'resume.safetensors'}, "
                "or pass --overwrite to replace it.")


RUN_FILES = (BEST_NAME, AVERAGED_NAME, "resume.safetensors")  # what one run (or one seed of repeats) writes


def earlier_run_leftovers(cfg: TrainConfig) -> list[Path]:
    """The files an earlier run left in ``cfg.out_dir`` that this run will not write, so that with
    ``--overwrite`` they would stay beside its results as if they were its own: an averaged
    checkpoint where this run does not average, a single run's files where this one repeats with
    other seeds (``seed_<n>/``), the seeds and summary of repeats where this one runs once."""
    out = Path(cfg.out_dir)
    if cfg.repeats > 1:
        seeds = {f"seed_{cfg.seed + i}" for i in range(cfg.repeats)}
        folders = [f for f in sorted(out.glob("seed_*")) if f.is_dir() and f.name not in seeds]
        found = [out / name for name in RUN_FILES]
    else:
        folders = [f for f in sorted(out.glob("seed_*")) if f.is_dir()]
        found = [out / "repeats.json"] + ([] if cfg.average_with_start else [out / AVERAGED_NAME])
    found += [folder / name for folder in folders for name in RUN_FILES]
    return [path for path in found if path.is_file()]


def remove_earlier_run_leftovers(cfg: TrainConfig) -> list[Path]:
    """``--overwrite``: removes ``earlier_run_leftovers`` (and the ``seed_<n>`` folders they leave
    empty); the files it removed. Only the names a run writes are touched, never a user's own."""
    removed = []
    for path in earlier_run_leftovers(cfg):
        path.unlink()
        removed.append(path)
        if path.parent.name.startswith("seed_") and not any(path.parent.iterdir()):
            path.parent.rmdir()
    return removed


def check_output_dir(out_dir: Path, need_bytes: int = 0) -> None:
    """Checks that ``out_dir`` can take the run's files (and removes the temp files a killed run
    left there)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out_dir)
        probe = temp_path(out_dir / "write-test")
        try:
            probe.write_bytes(b"0" * 1024)
        finally:
            probe.unlink(missing_ok=True)
    except OSError as exc:
        raise TrainingError(f"Cannot write checkpoints to '{out_dir}': {exc.strerror or exc}.") from exc
    if need_bytes:
        free = shutil.disk_usage(out_dir).free
        if free < need_bytes:
            raise TrainingError(
                f"Not enough free space in '{out_dir}': checkpoints need about {need_bytes / 1e6:.0f} MB, "
                f"{free / 1e6:.0f} MB are free."
            )


def _missing_folders(out_dir: Path) -> list[Path]:
    """The folders of ``out_dir``'s path (itself first) that do not exist yet."""
    missing = []
    for folder in (out_dir.absolute(), *out_dir.absolute().parents):
        if folder.exists():
            break
        missing.append(folder)
    return missing


@contextmanager
def removed_if_failed_empty(out_dir: Path):
    """Runs the block; where it fails, removes the folders it made for ``out_dir`` that are still
    empty: ``check_output_dir`` makes the folder before the data is read, and a run refused for its
    data had left an empty ``runs/<name>/`` behind."""
    made = _missing_folders(out_dir)
    try:
        yield
    except BaseException:
        for folder in made:  # the deepest first: a parent is empty only once its child is gone
            try:
                folder.rmdir()
            except OSError:  # not empty (the run wrote there), or not ours to remove: kept
                break
        raise


def estimated_bytes(model: torch.nn.Module, half: bool, with_resume: bool = True, with_average: bool = False) -> int:
    params = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    best = params // 2 if half else params
    # weights + two Adam moments (+ the weights' moving average, ema_decay)
    resume = params * (4 if with_average else 3) if with_resume else 0
    return 2 * (best + resume) + (1 << 20)  # atomic replace: old file + new file at once


@dataclass
class CheckpointWriter:
    """Writes a run's best checkpoint and resume file with what the run was made of."""

    cfg: TrainConfig  # as trained (the start checkpoint's model config, the data's class count)
    given: dict  # the config as given: a resumption must match it
    ctx: DistContext
    device: torch.device
    classes: list[str]
    normalization: dict  # {"mean": [...], "std": [...]}
    data: dict  # the data description recorded in the checkpoint
    foreground_threshold: float | None = None  # the start checkpoint's, until the run tunes its own
    # the start checkpoint's nucleus settings: the run's validation bPQ cuts nuclei with them, and
    # the checkpoint keeps them (they were tuned for the weights it grew from)
    instance_settings: dict = field(default_factory=dict)
    # the start checkpoint's class weights (medseg tune-classes), kept where the classes are its own
    class_choice_weights: list[float] = field(default_factory=list)

    @property
    def best_path(self) -> Path:
        return Path(self.cfg.out_dir) / BEST_NAME

    @property
    def resume_path(self) -> Path:
        return Path(self.cfg.out_dir) / "resume.safetensors"

    def kept_best(self, best_epoch: int) -> str:
        """How an error message says which best checkpoint survives it."""
        return "the best checkpoint so far is kept" + (
            f" ({self.best_path}, epoch {best_epoch})." if best_epoch > 0 else " (none yet).")

    def save_best(self, model: torch.nn.Module, epoch: int, record: dict, history: list[dict],
                  start_scores: dict | None = None) -> None:
        """Every rank calls this (DDP records each rank's parameter hash); rank 0 writes.
        ``start_scores``: the start model's validation metrics, where the monitor compared with them."""
        ctx = self.ctx
        hashes = ctx.gather_ints(int(parameter_hash(model)[:15], 16), self.device) if ctx.enabled else None
        if not ctx.is_main:
            return
        # the config that makes this model again: a resumed run's is its uninterrupted run's
        training = {"config": {**self.cfg.to_dict(), "resume": None}, "best_epoch": epoch, "history": history}
        if start_scores is not None:
            training["start_scores"] = start_scores
        if ctx.enabled:
            training["distributed"] = {"world_size": ctx.world_size, "backend": ctx.backend,
                                       "parameter_hash_prefixes": [f"{h:015x}" for h in hashes]}
        meta = CheckpointMeta(
            model=self.cfg.model, classes=self.classes, normalization=self.normalization,
            pixel_size_um=self.cfg.pixel_size_um, training=training, data=self.data,
            metrics={"validation": record}, model_card=self.cfg.model_card,
            foreground_threshold=self.foreground_threshold, instance_settings=dict(self.instance_settings),
            class_choice_weights=list(self.class_choice_weights),
        )
        try:
            save_checkpoint(self.best_path, model, meta, half=self.cfg.save_half)
        except OSError as exc:
            raise TrainingError(f"{exc.strerror or exc} The previous best checkpoint, if any, is unchanged."
                                if isinstance(exc, MedsegError) else
                                f"Cannot write the checkpoint {self.best_path}: {exc.strerror or exc}. "
                                "The previous best checkpoint, if any, is unchanged.") from exc

    def save_resume(self, epoch: int, progress: Progress, model: torch.nn.Module, optimizer, scheduler,
                    loader_generator: torch.Generator, scaler=None, ema=None) -> None:
        if not self.ctx.is_main or not self.cfg.save_resume:
            return
        from .resume import save_resume

        info = {"epoch": epoch, "config_given": self.given, "history": progress.history,
                "best_epoch": progress.best_epoch,
                "data": {"val_groups": self.data["val_groups"], "classes": self.classes},
                "world_size": self.ctx.world_size, **progress.resume_state()}
        try:
            save_resume(self.resume_path, model, optimizer, scheduler, loader_generator, info, scaler, ema)
        except OSError as exc:
            raise TrainingError(str(exc) if isinstance(exc, MedsegError) else
                                f"Cannot write {self.resume_path}: {exc.strerror or exc}.") from exc
