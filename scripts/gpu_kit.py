"""Pack one training stage for a lent GPU machine, and say the call that runs it there.

A lent machine (the workplace's ``device`` tool) gets the repository's working tree and the
folders named in ``carry``, 64 MiB in all; ``../shared``, where the training data live, does not
travel, and neither does ``segmentation-models-pytorch``, which its image lacks. The three sets
(CoNSeP, MoNuSeg, TNBC) take 92 MB as PNG, 59 MB as lossless WebP: over the limit beside the
20 MB tree. This script writes ``.gpu/`` (git-ignored):

- ``data/<set>/``: each dataset folder of the stage, its images as JPEG (quality 95, no chroma
  subsampling: about a third of the PNG; mean absolute error 0.4, 1.8 and 1.2 grey levels on
  CoNSeP, MoNuSeg and TNBC, well inside the colour augmentation; CoNSeP's patches were decoded from
  JPEG to begin with), its labels, instances and classes.json as they are (they decide the split
  and the scores);
- the stage's start checkpoint (and ImageNet encoder, averaging partner or the model it is
  compared with) where it lies outside the tree; the shipped default is read from the tree itself;
- ``run.yaml``: the stage's settings, paths pointing into ``.gpu``; on the GPU its ``on_cuda``
  settings apply as they would in ``medseg train``;
- ``wheels/``: segmentation-models-pytorch as installed here (pure Python), fetched with pip;
- ``run.sh``: installs the wheel, trains with ``--time-limit``, and copies the result, its log
  and the run's record into ``$OUT``.

The stage's images there are the JPEG copies, so its validation figures differ slightly from the
same model's on the originals: measure the result here, with ``benchmarks/accuracy.py`` on
``../shared``. One stage a call: a later stage starts from an earlier one's result, which comes
back through ``$OUT`` and is packed (``--set init_checkpoint=...``) for the next call.

    python scripts/gpu_kit.py configs/all_data.yaml --stage mixed --minutes 7
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIMIT_BYTES = 64 * 2**20  # what travels to the device machine: the tree and the carried folders
JPEG_QUALITY = 95  # of the RGB images only, with 4:4:4 chroma: the kit leaves room for a 13 MB start checkpoint
RESULT_FILES = ("best.safetensors", "averaged.safetensors")  # whichever the run wrote (its record is inside)
STARTUP_SECONDS = 120  # the device call beyond training: the wheel, data reading, the end steps
CALL_SECONDS = 600  # the longest one device command may run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", type=Path, help="a medseg training config (its stages, if any)")
    p.add_argument("--stage", help="the stage to run (default: the first); one stage a call")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as medseg train's --set")
    p.add_argument("--minutes", type=float, default=7.0, help="medseg train --time-limit on the GPU (default 7)")
    p.add_argument("--out", type=Path, default=REPO / ".gpu", help="the folder to write (replaced; default .gpu)")
    p.add_argument("--wheels-from", type=Path, help="a folder already holding the segmentation-models-pytorch "
                                                     "wheel (else pip downloads it)")
    args = p.parse_args(argv)
    kit = pack(args.config, args.stage, args.set, args.minutes, args.out, args.wheels_from)
    print(describe(kit))
    return 0


def pack(config: Path, stage_name: str | None, overrides: list[str], minutes: float, out: Path,
         wheels_from: Path | None = None) -> dict:
    """Write the kit to ``out`` (replacing an earlier one) and return what it holds."""
    from napari_medseg.training.stages import load_train_stages

    if not (minutes > 0 and minutes * 60 + STARTUP_SECONDS <= CALL_SECONDS):
        raise SystemExit(f"--minutes {minutes:g}: a device command runs {CALL_SECONDS // 60} minutes at most, "
                         f"{STARTUP_SECONDS} s of them for its start: give at most "
                         f"{(CALL_SECONDS - STARTUP_SECONDS) / 60:g} minutes.")
    stage = load_train_stages(config, overrides, stage_name)[0]
    out = out.resolve()
    building = out.with_name(out.name + ".partial")  # the earlier kit stays whole until this one is
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    try:
        kit = _build(stage, config, minutes, building, out, wheels_from)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    building.rename(out)
    return kit


def _build(stage, config: Path, minutes: float, building: Path, out: Path, wheels_from: Path | None) -> dict:
    """The kit's files in ``building``, every path in them as they will be under ``out``."""
    settings = stage.config.to_dict()
    sets = []
    for spec in settings["data"]["datasets"] or []:
        spec["path"] = _pack_dataset(Path(spec["path"]), building / "data", out / "data", sets)
    settings["data"]["dataset"] = [_pack_dataset(Path(path), building / "data", out / "data", sets)
                                   for path in settings["data"]["dataset"] or []]
    if not settings["data"]["dataset"]:
        del settings["data"]["dataset"]  # its default
    for key in ("init_checkpoint", "average_with", "compare_with"):
        if settings.get(key):
            settings[key] = _file_in_tree(Path(settings[key]), building, out)
    if settings["model"].get("encoder_weights") not in (None, "", "imagenet"):
        settings["model"]["encoder_weights"] = _file_in_tree(Path(settings["model"]["encoder_weights"]), building, out)
    name = stage.name or "run"
    settings["out_dir"] = f"runs/gpu/{name}"
    settings["resume"] = None
    (building / "run.yaml").write_text(_yaml(settings))
    wheel = _wheel(building / "wheels", wheels_from)
    (building / "run.sh").write_text(_run_script(minutes, settings["out_dir"], out))
    kit = {"stage": name, "config": str(config), "folder": out, "minutes": minutes, "sets": sets,
           "wheel": wheel.name, "bytes": _size(building), "tree_bytes": _tree_bytes(out, building)}
    total = kit["bytes"] + kit["tree_bytes"]
    if total > LIMIT_BYTES:
        raise SystemExit(f"The kit ({kit['bytes'] / 2**20:.1f} MiB) and the working tree "
                         f"({kit['tree_bytes'] / 2**20:.1f} MiB) make {total / 2**20:.1f} MiB, over the "
                         f"{LIMIT_BYTES / 2**20:.0f} MiB that travel to the device machine.")
    return kit


def _pack_dataset(folder: Path, into: Path, final: Path, sets: list) -> str:
    """The dataset folder copied into ``into/<name>``, its images as JPEG; its path as the kit
    will have it (``final/<name>``, relative to the repository)."""
    from PIL import Image

    folder = folder if folder.is_absolute() else (Path.cwd() / folder)
    target = into / folder.name
    if target.exists():
        raise SystemExit(f"Two datasets are called '{folder.name}'; the kit names each by its folder.")
    (target / "images").mkdir(parents=True)
    # copyfile, not copy2: ../shared is read-only, and a read-only copy could not be replaced by the next kit
    shutil.copyfile(folder / "classes.json", target / "classes.json")
    for sub in ("labels", "instances"):
        if (folder / sub).is_dir():
            (target / sub).mkdir()
            for f in (folder / sub).iterdir():
                if f.is_file():
                    shutil.copyfile(f, target / sub / f.name)
    before = after = 0
    for image in sorted((folder / "images").iterdir()):
        if image.name.startswith(".") or not image.is_file():
            continue
        before += image.stat().st_size
        with Image.open(image) as im:
            if im.mode == "RGB" and im.format == "PNG":
                written = target / "images" / (image.stem + ".jpg")
                im.save(written, "JPEG", quality=JPEG_QUALITY, subsampling=0)
            else:  # grey, 16-bit or already small: as it is
                written = target / "images" / image.name
                shutil.copyfile(image, written)
        after += written.stat().st_size
    sets.append({"name": folder.name, "images": len(list((target / "images").iterdir())),
                 "png_bytes": before, "packed_bytes": after})
    return _relative(final / folder.name)


def _file_in_tree(path: Path, building: Path, final: Path) -> str:
    """A checkpoint the run reads: its path in the tree where it is tracked there (the shipped
    default), else copied into the kit."""
    path = path.resolve()
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: pack a stage whose start is a file (an earlier stage's result "
                         "comes back from the GPU and is given with --set init_checkpoint=...).")
    if path.is_relative_to(REPO) and _tracked(path):
        return str(path.relative_to(REPO))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8]  # two files of one name stay two
    copied = building / "start" / f"{path.stem}.{digest}{path.suffix}"
    copied.parent.mkdir(exist_ok=True)
    shutil.copyfile(path, copied)
    return _relative(final / "start" / copied.name)


def _tracked(path: Path) -> bool:
    done = subprocess.run(["git", "-C", str(REPO), "ls-files", "--error-unmatch", str(path)],
                          capture_output=True)
    return done.returncode == 0


def _relative(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _wheel(folder: Path, wheels_from: Path | None) -> Path:
    """segmentation-models-pytorch, the version installed here, as a wheel in ``folder``."""
    folder.mkdir()
    version = metadata.version("segmentation-models-pytorch")
    name = f"segmentation_models_pytorch-{version}-py3-none-any.whl"
    if wheels_from is not None and (wheels_from / name).is_file():
        shutil.copyfile(wheels_from / name, folder / name)
    else:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "-d", str(folder), f"segmentation-models-pytorch=={version}"], check=True)
    if not (folder / name).is_file():
        raise SystemExit(f"pip did not fetch {name}.")
    return folder / name


def _run_script(minutes: float, out_dir: str, kit: Path) -> str:
    rel = _relative(kit)
    results = " ".join(RESULT_FILES)
    return f"""#!/usr/bin/env bash
# Made by scripts/gpu_kit.py: run on the device machine from the repository's root, $OUT set.
set -uo pipefail
export PYTHONPATH="$PWD/src:/tmp/site" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site {rel}/wheels/*.whl || exit 3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
mkdir -p "$OUT"
python3 -m napari_medseg train {rel}/run.yaml --time-limit {minutes:g} 2>&1 | tee "$OUT/train.log"
status=${{PIPESTATUS[0]}}
for f in {results}; do if [ -f "{out_dir}/$f" ]; then cp "{out_dir}/$f" "$OUT/"; fi; done
exit $status
"""


def _yaml(settings: dict) -> str:
    import yaml

    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return ("# Made by scripts/gpu_kit.py: one stage, its paths in the kit; on a GPU its on_cuda settings apply.\n"
            + yaml.safe_dump(plain(settings), sort_keys=False))


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _tree_bytes(*kit: Path) -> int:
    """What else travels: tracked files and untracked ones git does not ignore (the kit aside)."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.split(b"\0")
    total = 0
    for name in filter(None, listed):
        path = REPO / os.fsdecode(name)
        if path.is_file() and not any(path.is_relative_to(k) for k in kit):
            total += path.stat().st_size
    return total


def describe(kit: dict) -> str:
    folder = _relative(kit["folder"])
    lines = [f"{folder}: stage '{kit['stage']}' of {kit['config']}, {kit['bytes'] / 2**20:.1f} MiB "
             f"(+ the tree's {kit['tree_bytes'] / 2**20:.1f} MiB; {LIMIT_BYTES / 2**20:.0f} MiB travel)"]
    for s in kit["sets"]:
        lines.append(f"  {s['name']}: {s['images']} images, {s['png_bytes'] / 2**20:.1f} MiB -> "
                     f"{s['packed_bytes'] / 2**20:.1f} MiB")
    call = {"command": f"bash {folder}/run.sh", "carry": [folder],
            "timeout_s": int(kit["minutes"] * 60 + STARTUP_SECONDS)}
    lines.append(f"device run: {json.dumps(call)}")
    lines.append("then here, on the originals: python benchmarks/accuracy.py --per-set --threads 2 "
                 "--split-from-model default --model default --model <files_at>/best.safetensors")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
