"""Several training runs in one config, each starting from the one before (``stages:``).

A config may end with a list of stages; each stage is the top-level settings with its own
changes merged in (sections such as ``model`` or ``data`` merge key by key)::

    lr: 0.002
    epochs: 32
    out_dir: runs/default
    stages:
      - name: scratch                 # runs/default/scratch
      - name: warm_restart            # starts from runs/default/scratch/best.safetensors
        lr: 0.0005
        epochs: 20

Stage ``k > 1`` starts from stage ``k - 1``'s result (its best checkpoint, or that averaged with
its own start where it sets ``average_with_start``; ``average_with: <earlier stage>`` averages with
that stage's result instead) unless it names its own ``init_checkpoint``;
each writes to ``<out_dir>/<name>``, and ``<out_dir>/stages.json`` records
what every finished stage produced. Command-line overrides (``--set``) apply to every stage,
except ``out_dir`` and ``init_checkpoint``, which set the run's folder and the first stage's start
(and ``resume``, like a top-level ``resume:``, the first stage that runs continues from it).
So one ``medseg train`` command reproduces a model that took several schedules to make.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..io.images import atomic_write
from .config import TrainConfig, TrainConfigError, apply_overrides, merge_settings, read_config_mapping, result_name
from .loop import TIME_LIMIT, USER_STOP
from .trainer import TrainingDone, TrainingError, train

STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
RUN_LEVEL = ("out_dir", "init_checkpoint", "resume")  # overrides that belong to the run, not to each stage


@dataclass
class Stage:
    name: str  # "" for a config without stages
    config: TrainConfig


@dataclass
class StagesDone:
    stages: list[Stage]
    results: list[TrainingDone] = field(default_factory=list)
    path: Path | None = None  # stages.json

    @property
    def checkpoint(self) -> Path | None:
        """The last finished stage's best checkpoint: the model the run was for."""
        return self.results[-1].checkpoint if self.results else None


def _key(override: str) -> str:
    return override.split("=", 1)[0].strip()


def load_train_stages(path: str | Path | None, overrides: list[str] = (), from_stage: str | None = None) -> list[Stage]:
    """The runs a config describes: one unnamed stage, or its ``stages`` from ``from_stage`` on.

    An ``init_checkpoint`` override sets where the first stage that runs starts; ``out_dir``
    the folder that holds every stage's; any other override applies to every stage.
    """
    data = read_config_mapping(path)
    specs = data.pop("stages", None)
    if specs is None:
        if from_stage is not None:
            raise TrainConfigError(f"--from-stage {from_stage}: {path} has no stages.")
        return [Stage("", TrainConfig.from_dict(apply_overrides(data, overrides), source=path))]
    if not isinstance(specs, list) or not specs or not all(isinstance(s, dict) for s in specs):
        raise TrainConfigError(f"{path}: 'stages' must be a non-empty list of mappings, each with a 'name'.")
    names = [str(spec.get("name", "")) for spec in specs]
    for number, name in enumerate(names, 1):
        if not STAGE_NAME.match(name):
            raise TrainConfigError(f"{path}: Stage {number} needs a 'name' of letters, digits, '_', '.' or '-' "
                                   f"(it names its folder), got {name!r}.")
        if names.count(name) > 1:
            raise TrainConfigError(f"{path}: Two stages are called '{name}': stage names must differ.")
    if from_stage is not None and from_stage not in names:
        raise TrainConfigError(f"No stage is called '{from_stage}'; the stages are: {', '.join(names)}.")
    first = from_stage or names[0]
    start = [o for o in overrides if _key(o) == "init_checkpoint"]
    per_stage = [o for o in overrides if _key(o) not in RUN_LEVEL]
    apply_overrides(data, [o for o in overrides if _key(o) in ("out_dir", "resume")])
    # a resume file is one stage's, the first that runs (as --resume): given to every stage, the
    # next one refused it after the first had trained ("The config differs from the run being resumed")
    resume = data.pop("resume", None)
    base_out = Path(str(data.get("out_dir", TrainConfig.out_dir)))
    stages: list[Stage] = []
    for name, spec in zip(names, specs):
        spec = {k: v for k, v in spec.items() if k != "name"}
        for key in ("out_dir", "stages", "resume"):
            if key in spec:
                raise TrainConfigError(f"{path}: Stage '{name}' sets '{key}', which belongs to the whole run.")
        _check_gpu_keeps(path, name, data.get("on_cuda") or {}, spec)
        merged = apply_overrides(merge_settings(data, spec), per_stage)
        merged["out_dir"] = str(base_out / name)
        if stages and "init_checkpoint" not in spec:
            merged["init_checkpoint"] = str(Path(stages[-1].config.out_dir) / result_name(stages[-1].config))
        if merged.get("average_with") in names:  # an earlier stage's result
            partner, earlier = str(merged["average_with"]), {s.name: s.config for s in stages}
            if partner not in earlier:
                raise TrainConfigError(f"{path}: Stage '{name}' averages with stage '{partner}', which does not "
                                       "come before it.")
            merged["average_with"] = str(Path(earlier[partner].out_dir) / result_name(earlier[partner]))
        if name == first:
            apply_overrides(merged, start)
            merged["resume"] = resume
        try:
            cfg = TrainConfig.from_dict(merged)
        except TrainConfigError as exc:
            raise TrainConfigError(f"{path}: Stage '{name}': {exc}") from None
        if cfg.repeats > 1:
            raise TrainConfigError(f"{path}: Stage '{name}': repeats > 1 cannot be combined with stages "
                                   "(which seed's checkpoint would the next stage start from?).")
        stages.append(Stage(name, cfg))
    return stages[names.index(first):]


def _flat(settings: dict, prefix: str = "") -> dict:
    """``{"data": {"crop_size": 256}}`` as ``{"data.crop_size": 256}``."""
    out = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _check_gpu_keeps(path, name: str, base_on_cuda: dict, spec: dict) -> None:
    """Refuse a stage setting that the config's own ``on_cuda`` would silently replace on a GPU:
    ``all_data.yaml``'s second stage, "a lower cosine cycle" at lr 0.00025, ran at the top-level
    on_cuda's 0.001 there. The stage says what it wants on a GPU in its own ``on_cuda``."""
    own = _flat({k: v for k, v in spec.items() if k != "on_cuda"})
    gpu, stage_gpu = _flat(base_on_cuda), _flat(spec.get("on_cuda") or {})
    lost = [key for key, value in own.items() if key in gpu and gpu[key] != value and key not in stage_gpu]
    if lost:
        said = ", ".join(f"{key} {own[key]!r} (on_cuda: {gpu[key]!r})" for key in lost)
        example = "..."
        for part in reversed(lost[0].split(".")):
            example = f"{{{part}: {example}}}"
        raise TrainConfigError(f"{path}: Stage '{name}' sets {said}, which the config's on_cuda would replace on a "
                               f"CUDA GPU; say what the stage takes there in its own on_cuda (on_cuda: {example}).")


def train_stages(stages: list[Stage], on_update=None, should_stop=None, on_stage=None, items=None,
                 deadline: float | None = None) -> StagesDone:
    """Train ``stages`` in order; ``on_stage(index, stage, result_or_None)`` before and after each.

    A stage that ends without a checkpoint (stopped before its first epoch finished), that the
    user stopped or that ran out of time (``deadline``, as ``train``'s) ends the run: the next
    stage would have nothing, or not the intended weights, to start from.
    """
    done = StagesDone(list(stages))
    if not stages:
        return done
    first = stages[0].config.init_checkpoint
    if first and not Path(first).is_file():
        if not stages[0].name:  # a config without stages
            raise TrainingError(f"init_checkpoint '{first}' does not exist.")
        raise TrainingError(f"Stage '{stages[0].name}' starts from '{first}', which does not exist (if it is an "
                            "earlier stage's checkpoint, run that stage first).")
    if stages[0].name:
        done.path = Path(stages[0].config.out_dir).parent / "stages.json"
    for index, stage in enumerate(stages):
        if on_stage is not None:
            on_stage(index, stage, None)
        result = train(stage.config, on_update, should_stop, items, deadline)
        done.results.append(result)
        if done.path is not None:
            _write_summary(done)
        if on_stage is not None:
            on_stage(index, stage, result)
        if result.reason == USER_STOP or (result.reason or "").startswith(TIME_LIMIT):
            break
        if result.checkpoint is None and index + 1 < len(stages):
            raise TrainingError(f"Stage '{stage.name}' saved no checkpoint, so stage "
                                f"'{stages[index + 1].name}' has nothing to start from.")
    return done


def _write_summary(done: StagesDone) -> None:
    """stages.json: every finished stage's record; a rerun (``--from-stage``) replaces the records
    of the stages it ran and keeps the others."""
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 writes
        return
    records = {}
    try:
        records = {r["name"]: r for r in json.loads(done.path.read_text())["stages"]}
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no earlier record (or an unreadable one): start afresh
    for s, r in zip(done.stages, done.results):
        records[s.name] = {"name": s.name, "init_checkpoint": s.config.init_checkpoint, "out_dir": s.config.out_dir,
                           "checkpoint": str(r.checkpoint) if r.checkpoint else None, "best_epoch": r.best_epoch,
                           "stopped": r.reason or None, "best": r.best_metrics}
    text = json.dumps({"stages": list(records.values())}, indent=1, default=float)
    atomic_write(done.path, lambda tmp: tmp.write_text(text))
