"""``medseg train``: stages, repeats and the time limit, printed as they go; how to resume."""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

from ..errors import MedsegError
from ..wording import counted
from .interrupts import Terminated
from .terminal import ProgressLine
from .tune import few_images_caution


def _epoch_line(prefix: str, update) -> str:
    m = update.metrics
    if not m:  # no validation images (data.val_fraction 0): the trainer keeps the lowest training loss
        return (f"{prefix}epoch {update.epoch}/{update.epochs}  train_loss {update.train_loss:.4f}  "
                f"(no validation images: the best epoch is the lowest training loss)  lr {update.lr:.2e}  "
                f"{'*best*' if update.best else ''}  {update.seconds:.0f}s")
    # class figures only where there are classes (a run on nucleus-only sets has none: they were 'nan')
    figures = [(name, m.get(key, float("nan"))) for name, key in
               (("val_mIoU", "miou"), ("val_mean_class_dice", "mean_dice"), ("val_nucleus_dice", "nucleus_dice"),
                ("val_bPQ", "bpq"))]
    shown = "  ".join(f"{name} {value:.4f}" for name, value in figures
                      if not (name in ("val_mIoU", "val_mean_class_dice") and math.isnan(value)))
    if "least_gain_over_start" in m:  # what monitor val_least_gain_over_start keeps the best epoch by
        shown += f"  least_gain_over_start {m['least_gain_over_start']:+.4f}"
    return (f"{prefix}epoch {update.epoch}/{update.epochs}  train_loss {update.train_loss:.4f}  "
            f"val_loss {update.val_loss:.4f}  {shown}  "
            f"lr {update.lr:.2e}  "
            f"{'*best*' if update.best else ''}  {update.seconds:.0f}s" + _per_set(m.get("sets")))


def _per_set(sets: dict | None) -> str:
    """Mixed-label runs: each validation set's nucleus Dice and bPQ on its own line."""
    if not sets:
        return ""
    return "".join(f"\n    {name}: nucleus_dice {s.get('nucleus_dice', float('nan')):.4f}  "
                   f"bPQ {s.get('bpq', float('nan')):.4f}" for name, s in sets.items())


class _TrainPrinter:
    """A training run on the terminal: a bar through each epoch, a line per epoch, a line per stage.
    Under torchrun only rank 0 prints stage and run lines."""

    def __init__(self, stages):
        self.stages, self.stage = stages, stages[0]
        self.main_rank = int(os.environ.get("RANK", "0")) == 0
        self.bar = ProgressLine("train")
        self.epochs_seen = 0  # a resumed run that had finished trains none

    def _prefix(self) -> str:
        return f"[{self.stage.name}] " if self.stage.name else ""

    def update(self, update) -> None:
        from ..training import BatchDone, DataSplit, EpochDone, StartScored

        if isinstance(update, DataSplit):
            for line in update.lines():
                print(f"{self._prefix()}{line}", flush=True)
            if update.note:
                print(f"medseg train: note: {update.note}", file=sys.stderr, flush=True)
        elif isinstance(update, StartScored):
            print(f"{self._prefix()}{update.note}", flush=True)
        elif isinstance(update, BatchDone):
            self.bar.label = f"{self._prefix()}epoch {update.epoch}/{update.epochs or self.stage.config.epochs}"
            self.bar(update.step, update.steps)
        elif isinstance(update, EpochDone):
            self.epochs_seen += 1
            print(_epoch_line(self._prefix(), update), flush=True)
            self.bar.t0 = time.time()

    def stage_event(self, index, stage, result) -> None:
        self.stage = stage
        if not self.main_rank or not stage.name:
            return
        if result is None:
            start = stage.config.init_checkpoint or "new weights"
            gpu = (f" ({stage.config.for_device('cuda').epochs} on a CUDA GPU)"
                   if stage.config.on_cuda.get("epochs", stage.config.epochs) != stage.config.epochs else "")
            print(f"stage {index + 1}/{len(self.stages)} '{stage.name}': {stage.config.epochs} epochs{gpu} "
                  f"from {start} -> {stage.config.out_dir}", flush=True)
        else:
            print(f"stage '{stage.name}': {_result_words(stage.config, result)}", flush=True)

    def run_done(self, seed, result) -> None:
        if self.main_rank:
            print(f"seed {seed}: best epoch {result.best_epoch}; checkpoint {result.checkpoint}", flush=True)


def cmd_train(args) -> int:
    from ..training import loop as training_loop
    from ..training.checkpoints import check_fresh_run, remove_earlier_run_leftovers
    from ..training.loop import TIME_LIMIT
    from ..training.stages import load_train_stages, train_stages

    args.started = time.time()  # a resume file older than this is an earlier run's (--overwrite)
    stages = load_train_stages(args.config, list(args.set or []), args.from_stage)
    # --resume, or resume: in the config (the first running stage's only): the same run goes on
    resume = args.resume or stages[0].config.resume
    if resume:
        if stages[0].config.repeats > 1:
            raise MedsegError("--resume continues one run; with repeats each seed is a run of its own: resume "
                              "one with --set repeats=1 --set seed=N --set out_dir=<its seed_N folder>.")
        if not Path(resume).is_file():  # said before 'continuing in' a folder it would not go on in
            raise MedsegError(f"Resume file '{resume}' does not exist.")
        # the resume file belongs to the first stage that runs; its config must match it, and the
        # run goes on in the resume file's folder (its best checkpoint is there)
        stages[0].config.resume = str(resume)
        folder = str(Path(resume).resolve().parent)
        if Path(stages[0].config.out_dir).resolve() != Path(folder):
            print(f"medseg train: continuing in {folder}, the resumed run's folder (not {stages[0].config.out_dir})",
                  file=sys.stderr)
            stages[0].config.out_dir = folder
    elif not args.overwrite:
        check_fresh_run([Path(stage.config.out_dir) for stage in stages])
    elif int(os.environ.get("RANK", "0")) == 0:  # under torchrun the first process alone
        for stage in stages:
            for path in remove_earlier_run_leftovers(stage.config):
                print(f"--overwrite: removed {path}, an earlier run's file this run would not replace",
                      file=sys.stderr)
    printer = _TrainPrinter(stages)
    if stages[0].config.repeats > 1:  # a config without stages (stages refuse repeats)
        if args.time_limit:
            raise MedsegError("--time-limit stops one run; with repeats a seed cut short would skew the mean +- std: "
                              "run the seeds one by one (--set repeats=1 --set seed=N).")
        return _train_repeats(stages[0].config, printer)
    deadline = None if not args.time_limit else training_loop.clock() + 60 * args.time_limit
    try:
        done = train_stages(stages, on_update=printer.update, on_stage=printer.stage_event, deadline=deadline)
    except (Terminated, KeyboardInterrupt):
        _print_resume_hint(args, printer.stage, printer.stage.name == stages[0].name)
        raise
    if printer.main_rank:
        result, stage = done.results[-1], done.stages[len(done.results) - 1]
        if resume and not printer.epochs_seen:
            print(f"the run in {Path(resume).resolve().parent} had finished: nothing trained")
        if result.reason:
            print(f"stopped: {result.reason}")
        print(_result_words(stage.config, result))
        _say_tuned_threshold(result.checkpoint)
        if done.path is not None:
            print(f"wrote {done.path}")
        if (result.reason or "").startswith(TIME_LIMIT):
            _print_resume_hint(args, stage, stage.name == stages[0].name, "stopped by --time-limit")
    return 0


def _print_resume_hint(args, stage, first_stage: bool = True, what: str = "interrupted") -> None:
    """After an interrupted run (or one ``what`` else ended early): the command that continues it,
    with every ``--set`` it was given (without them the config would differ, or the run would go on
    in another folder)."""
    import shlex

    resume = Path(stage.config.out_dir) / "resume.safetensors"
    if int(os.environ.get("RANK", "0")) != 0:
        return
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    # a torchrun run resumes with as many processes (the trainer refuses another number)
    start = (["torchrun", "--nproc_per_node", str(world_size), "-m", "napari_medseg"] if world_size > 1
             else ["medseg"])
    words = start + ["train", str(args.config)] + [w for kv in (args.set or []) for w in ("--set", kv)]
    if not resume.is_file() or resume.stat().st_mtime < getattr(args, "started", 0):
        # before its first epoch ended: nothing of this run to resume (an earlier run's file would refuse it)
        if first_stage:
            print(f"{what} before the first epoch ended: nothing to resume; run the same command again",
                  file=sys.stderr)
            return
        # the stages before it are done: the same command would be refused (their folders hold models)
        best = Path(stage.config.out_dir) / "best.safetensors"
        words += ["--from-stage", stage.name] + (["--overwrite"] if best.is_file() else [])
        print(f"{what} before stage '{stage.name}' ended its first epoch (the stages before it are done); "
              f"start it again with: {shlex.join(words)}", file=sys.stderr)
        return
    words += (["--from-stage", stage.name] if stage.name else []) + ["--resume", str(resume)]
    print(f"resume with: {shlex.join(words)}", file=sys.stderr)


def _result_words(config, result) -> str:
    """'best epoch N; checkpoint P', saying so where P is that epoch averaged with the run's start."""
    from ..training.config import AVERAGED_NAME, average_partner

    if result.checkpoint is None:  # stopped before an epoch ended (it had read 'best epoch -1; checkpoint None')
        return "no epoch ended: no checkpoint written"
    averaged = result.checkpoint.name == AVERAGED_NAME
    partner = average_partner(config)
    if averaged:  # what the average recorded: a start the run itself replaced is named as it was
        from ..models import read_meta

        try:
            partner = (read_meta(result.checkpoint).training or {}).get("averaged", {}).get("start") or partner
        except MedsegError:
            pass
    how = f" (averaged with {partner}, {config.average_with_start:g} on this run)" if averaged else ""
    return f"best epoch {result.best_epoch}; checkpoint {result.checkpoint}{how}"


def _say_tuned_threshold(checkpoint) -> None:
    """The foreground threshold a run tuned at its end on its validation images (tune_threshold):
    said, with the caution ``tune-threshold`` gives, where it chose it on few images."""
    from ..models import read_meta
    from ..training.threshold import TRAINING_VALIDATION_IMAGES

    if checkpoint is None:
        return
    try:
        tuning = read_meta(checkpoint).metrics.get("threshold_tuning") or {}
    except MedsegError:
        return
    if tuning.get("data") == TRAINING_VALIDATION_IMAGES and "images" in tuning:
        print(f"foreground threshold {tuning['threshold']:.2f}, tuned on the {counted(tuning['images'], 'validation image')}")
        few_images_caution(int(tuning["images"]))


def _train_repeats(config, printer: _TrainPrinter) -> int:
    from ..training.repeat import format_summary, train_repeats

    done = train_repeats(config, on_update=printer.update, on_run=printer.run_done)
    if printer.main_rank:
        print(f"{len(done.runs)} runs (seeds {', '.join(map(str, done.seeds))}), best epochs, mean ± std: "
              f"{format_summary(done.summary)}")
        print(f"wrote {done.path}")
    return 0
