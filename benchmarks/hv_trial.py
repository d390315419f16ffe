"""Trial, not product: would HoVer-Net's horizontal / vertical maps part the touching nuclei that
the distance head merges?

A third of CoNSeP's held-out nuclei are cut together with a neighbour (README, *Accuracy*): the
distance map's cores run into one another across the neck where two nuclei touch, and no loss
weighting tried made the network draw a saddle there. HoVer-Net's maps do not need a saddle:
each nucleus pixel's offset from its own centre, x and y, scaled to [-1, 1] per nucleus, flips
sign across the line where two nuclei meet, so the maps' gradient marks that line.

``train``: the shipped default with two more output channels (its weights otherwise as they
are), fine-tuned on ``configs/all_data.yaml``'s data and loss plus HoVer-Net's map loss (mean
squared error, and that of the maps' gradients inside nuclei), for a given number of minutes.
With ``--branch`` the shipped network stays frozen and the maps come from a decoder branch of
their own (HoVer-Net's layout), so only the cut can change what the product would give.
``score``: the held-out images of each set (the default's split), one whole-image forward pass,
nuclei cut (a) as the product cuts them (distance cores), (b) with the cores also cut where the
maps' gradient says a boundary runs (``--energy`` thresholds), scored as ``accuracy.py`` scores.

    python benchmarks/hv_trial.py train --minutes 70 --out runs/hv
    python benchmarks/hv_trial.py train --branch --minutes 45 --steps 2000 --out runs/hv_branch
    python benchmarks/hv_trial.py score --weights runs/hv/last.safetensors --training-images
    python benchmarks/hv_trial.py score --weights runs/hv/last.safetensors --energy 0.3
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

DATA = Path(os.environ.get("MEDSEG_DATA", REPO.parent / "shared" / "data"))
SETS = ("consep_train", "monuseg_train", "tnbc_train")
MAP_CHANNELS = 2  # horizontal, vertical


# --- targets -----------------------------------------------------------------------------------

def hv_maps(instances: np.ndarray) -> np.ndarray:
    """float32 ``(2, H, W)``: each nucleus pixel's x and y offset from its nucleus's centre of
    mass, negative and positive sides each scaled to [-1, 0] and [0, 1] (HoVer-Net's targets);
    0 on background."""
    from scipy import ndimage as ndi

    out = np.zeros((2,) + instances.shape, np.float32)
    for index, box in enumerate(ndi.find_objects(instances), start=1):
        if box is None:
            continue
        inside = instances[box] == index
        ys, xs = np.nonzero(inside)
        for axis, coords in ((0, xs), (1, ys)):
            offset = coords - coords.mean()
            low, high = -offset.min(), offset.max()
            scaled = np.where(offset < 0, offset / low if low > 0 else 0.0, offset / high if high > 0 else 0.0)
            out[axis][box][ys, xs] = scaled.astype(np.float32)
    return out


@functools.cache
def _sobel5() -> torch.Tensor:
    """(2, 1, 5, 5): the x and y kernels of HoVer-Net's 5x5 Sobel."""
    r = torch.arange(-2, 3, dtype=torch.float32)
    h, v = torch.meshgrid(r, r, indexing="xy")
    kx = h / (h * h + v * v).clamp(min=1)
    return torch.stack([kx, kx.T]).unsqueeze(1)


def map_gradients(maps: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) -> (B, 2, H, W): d(horizontal)/dx and d(vertical)/dy, 5x5 Sobel (HoVer-Net's)."""
    k = _sobel5().to(maps)
    padded = F.pad(maps, (2, 2, 2, 2), mode="replicate")
    return torch.cat([F.conv2d(padded[:, :1], k[:1]), F.conv2d(padded[:, 1:], k[1:])], 1)


def hv_loss(predicted: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, nucleus: torch.Tensor) -> torch.Tensor:
    """HoVer-Net's map loss: mean squared error over valid pixels plus that of the maps'
    gradients over nucleus pixels."""
    predicted = predicted.float()
    if not valid.any():
        return predicted.sum() * 0.0
    mse = (predicted - target).pow(2).sum(1)[valid].mean()
    inner = nucleus & valid
    if not inner.any():
        return mse
    msge = (map_gradients(predicted) - map_gradients(target)).pow(2).sum(1)[inner].mean()
    return mse + msge


# --- training ----------------------------------------------------------------------------------

class MapPatches(torch.utils.data.Dataset):
    """The trainer's crops (its augmentation, distance targets and touch weights) plus each
    crop's HoVer maps, made from its augmented instance map (flips and rotations change them)."""

    def __init__(self, items, crop_size, augment, mean, std, touch_weight):
        from napari_medseg.training.augment import build_augmentation
        from napari_medseg.training.data import distance_target, item_instances, touch_weights

        self.items = items
        self.instances = [item_instances(it).astype(np.float32) for it in items]
        self.distances = [distance_target(it) for it in items]
        self.weights = [touch_weights(it, touch_weight) for it in items]
        self.transform = build_augmentation(augment, crop_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, pair):
        index, seed = pair
        item = self.items[index]
        torch.manual_seed(seed)
        image, labels, distance, weight, ids = self.transform(
            torch.from_numpy(item.image).permute(2, 0, 1), torch.from_numpy(item.labels.astype(np.int64)),
            torch.from_numpy(self.distances[index]), torch.from_numpy(self.weights[index]),
            torch.from_numpy(self.instances[index]))
        ids_np = ids.numpy()
        outside = ids_np < 0
        maps = hv_maps(np.where(outside, 0, ids_np).astype(np.int32))
        # the maps are trusted where the distance target is (TNBC's merged components are not)
        valid = ~outside & (distance.numpy() >= 0)
        return ((image - self.mean) / self.std, labels, distance, weight, torch.from_numpy(maps),
                torch.from_numpy(valid), torch.from_numpy(ids_np > 0))


def grown_model(model_cfg, state):
    """The network of ``model_cfg`` with ``MAP_CHANNELS`` more outputs, ``state`` in its first rows."""
    from napari_medseg.models.registry import build_model
    from napari_medseg.training.network import load_growing_head

    wider = replace(model_cfg, num_classes=model_cfg.num_classes + MAP_CHANNELS, encoder_weights=None)
    model = build_model(wider)
    load_growing_head(model, state)
    return model


class BranchedMaps(torch.nn.Module):
    """The shipped network, frozen, and a decoder branch of its own for the maps (HoVer-Net's
    design: each output its own decoder), started from a copy of the network's decoder. Its
    classes and distance map are the default's, whatever the branch learns; the logits are laid
    out as ``grown_model``'s (classes, distance, maps)."""

    def __init__(self, network: torch.nn.Module):
        import copy

        from segmentation_models_pytorch.base import SegmentationHead

        super().__init__()
        self.network = network.requires_grad_(False)
        self.branch = copy.deepcopy(network.decoder).requires_grad_(True)
        head_in = network.segmentation_head[0].in_channels
        self.branch_head = SegmentationHead(in_channels=head_in, out_channels=MAP_CHANNELS, kernel_size=3)

    def train(self, mode: bool = True):
        super().train(mode)
        self.network.eval()  # frozen: its batch-norm statistics stay the shipped ones
        return self

    def maps(self, features):
        return self.branch_head(self.branch(features))

    def forward(self, x):
        features = self.network.encoder(x)
        main = self.network.segmentation_head(self.network.decoder(features))
        return torch.cat([main, self.maps(features)], 1)


def is_branched(state: dict) -> bool:
    return any(k.startswith("branch.") for k in state)


def train(args) -> int:
    from napari_medseg.training.mixed import sampling_weights
    from napari_medseg.training.network import Precision
    from napari_medseg.training.setup import configure_runtime, load_start_checkpoint, prepare_data
    from napari_medseg.training.stages import load_train_stages
    from napari_medseg.training.trainer import _loss_function
    from napari_medseg.training.data import normalization_stats

    cfg = load_train_stages(str(REPO / "configs" / "all_data.yaml"))[0].config
    configure_runtime(cfg)
    torch.manual_seed(args.seed)
    start = load_start_checkpoint(cfg)
    data = prepare_data(cfg, None, start)
    device = torch.device("cpu")
    loss_fn = _loss_function(cfg, data, device)
    num_classes = len(data.classes)
    if args.branch:
        from napari_medseg.models.registry import build_model

        network = build_model(replace(cfg.model, encoder_weights=None))
        network.load_state_dict(start.weights)
        model = BranchedMaps(network)
    else:
        model = grown_model(cfg.model, start.weights)
    precision = Precision.for_device(cfg, device)
    model = model.to(memory_format=torch.channels_last) if precision.channels_last else model
    mean, std = normalization_stats(cfg.normalization)
    ds = MapPatches(data.train_items, cfg.data.crop_size, cfg.augment, mean, std, cfg.distance_touch_weight)
    weights = torch.tensor(sampling_weights(data.train_items, data.index, cfg.data.datasets), dtype=torch.float64)
    new_rows = slice(num_classes + 1, num_classes + 1 + MAP_CHANNELS)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=args.lr, weight_decay=cfg.weight_decay)
    steps = args.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "log.jsonl", "a")
    deadline = time.time() + args.minutes * 60
    rng = np.random.default_rng(args.seed)
    picks = torch.multinomial(weights, steps * cfg.batch_size, replacement=True, generator=torch.Generator().manual_seed(args.seed))
    model.train()
    average = None
    if args.ema:
        from napari_medseg.training.ema import WeightAverage

        average = WeightAverage(model, args.ema)
    kept = model if average is None else average.model  # what is saved: the average, where one is kept
    t0 = time.time()
    if not args.branch:
        head = model.segmentation_head[0]
        with torch.no_grad():  # the new rows start small: the trained channels' loss is not disturbed at first
            head.weight[new_rows] *= 0.1
            head.bias[new_rows] = 0
    for step in range(steps):
        if time.time() > deadline:
            print(f"time limit at step {step}", flush=True)
            break
        batch = [ds[(data.index[int(picks[step * cfg.batch_size + j])], int(rng.integers(2**31)))] for j in range(cfg.batch_size)]
        image, labels, distance, weight, maps, valid, nucleus = (torch.stack(t) for t in zip(*batch))
        if args.branch:  # the frozen network's outputs do not change: only the maps' loss
            with precision.autocast():
                with torch.no_grad():
                    features = model.network.encoder(precision.prepare(image))
                predicted = model.maps(features)
            base = torch.zeros(())
        else:
            with precision.autocast():
                logits = model(precision.prepare(image))
            base = loss_fn(logits[:, :num_classes + 1].float(), labels, distance, weight)
            predicted = logits[:, new_rows]
        extra = hv_loss(predicted, maps, valid, nucleus)
        loss = base + args.hv_weight * extra
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if average is not None:
            average.update(model)
        record = {"step": step, "loss": float(base.detach()), "hv": float(extra.detach()), "lr": sched.get_last_lr()[0],
                  "s": round(time.time() - t0, 1)}
        log.write(json.dumps(record) + "\n")
        log.flush()
        if step % 20 == 0:
            print(record, flush=True)
        if (step + 1) % 100 == 0:
            save(kept, cfg.model, out / "last.safetensors")
    save(kept, cfg.model, out / "last.safetensors")
    print(f"saved {out / 'last.safetensors'} after {time.time() - t0:.0f} s", flush=True)
    return 0


def save(model, model_cfg, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().float() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"model": json.dumps(asdict(model_cfg))})
    os.replace(tmp, path)


# --- scoring -----------------------------------------------------------------------------------

def boundary_energy(maps: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Where the maps fall steeply (one nucleus's +1 side meets the next one's -1 side): the
    larger of -d(h)/dx and -d(v)/dy, per px, from lightly smoothed maps."""
    if sigma > 0:
        from scipy import ndimage as ndi

        maps = np.stack([ndi.gaussian_filter(m, sigma) for m in maps])
    g = map_gradients(torch.from_numpy(maps[None].astype(np.float32)))[0].numpy()
    return np.maximum(-g[0], -g[1])


def split_nuclei(class_map, distance, energy, settings, energy_threshold, gated=False):
    """The product's cut (distance cores above the marker threshold, watershed of the distance
    within the foreground) with the cores also broken where the boundary energy exceeds
    ``energy_threshold`` (None: the product's cut as it is)."""
    from skimage.segmentation import watershed
    from napari_medseg.nuclei.watershed import (_core_seeds, _foreground, _seed_unseeded_components,
                                                consecutive_ids, semantic_to_instances)

    if energy_threshold is None:
        return semantic_to_instances(class_map, settings, distance)
    foreground, components, n = _foreground(class_map, settings)
    if n == 0:
        return np.zeros(class_map.shape, np.int32)
    cores = foreground & (distance > settings.marker_threshold) & (energy < energy_threshold)
    markers = _core_seeds(cores, settings.min_marker_size)
    _seed_unseeded_components(markers, components, n, distance)
    # the watershed's landscape: the distance map, or with ``gated`` the same with the
    # boundaries cut in (what a network that outputs the gated map would give the product)
    landscape = np.where(energy < energy_threshold, distance, 0) if gated else distance
    return consecutive_ids(watershed(-landscape, markers, mask=foreground).astype(np.int32))


def forward(model, image: np.ndarray, mean, std) -> np.ndarray:
    """Logits (C, H, W) of one whole image, mirrored up to a multiple of 32."""
    from napari_medseg.training.data import mirror_index

    from napari_medseg.io.images import to_rgb_float

    x = torch.from_numpy(to_rgb_float(image, 3)).permute(2, 0, 1).float()
    x = (x - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    h, w = x.shape[1:]
    x = x[:, mirror_index(h, h + (-h) % 32)][:, :, mirror_index(w, w + (-w) % 32)]
    with torch.no_grad():
        return model(x[None])[0, :, :h, :w].float().numpy()


def score(args) -> int:
    from napari_medseg.evaluation.benchmark import summarise
    from napari_medseg.evaluation.report import PairEvaluation
    from napari_medseg.evaluation.threshold import model_val_groups, samples_of_groups
    from napari_medseg.inference.class_decision import classify
    from napari_medseg.models.checkpoint import load_checkpoint
    from napari_medseg.models import resolve_model_path
    from napari_medseg.nuclei.watershed import InstanceSettings
    from napari_medseg.training.data import normalization_stats
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads)
    default_model, meta = load_checkpoint(resolve_model_path("default"))
    state = load_file(args.weights) if args.weights else None
    if state is not None and is_branched(state):
        model = BranchedMaps(default_model)
    else:
        model = grown_model(meta.model, default_model.state_dict())
    if state is not None:
        model.load_state_dict(state)
    model.eval()
    mean, std = normalization_stats(meta.normalization)
    held_out = model_val_groups(meta)
    settings = InstanceSettings.recorded(meta.instance_settings)
    energies = [None] + [float(e) for e in args.energy.split(",") if e]
    # (marker threshold, energy threshold): the product's cut first, then each pair
    variants = [(settings.marker_threshold, None)] + [(m, e) for m in markers_of(args, settings) for e in energies[1:]]
    results = {}
    for name in args.sets.split(","):
        folder = DATA / name
        classes, samples = samples_of_groups(folder, None)
        groups_held = {g.split("/", 1)[1] for g in held_out if g.startswith(name + "/")}
        samples = [s for s in samples if (s.group in groups_held) != args.training_images]
        if args.training_images:
            groups = sorted({s.group for s in samples})[:args.groups]
            samples = [s for s in samples if s.group in groups]
        evals = {v: PairEvaluation(classes, settings) for v in variants}
        for s in samples:
            logits = forward(model, s.image, mean, std)
            n = len(meta.classes)
            probs = torch.softmax(torch.from_numpy(logits[:n]), 0).numpy()
            distance = 1 / (1 + np.exp(-logits[n]))
            pred = classify(probs, meta.foreground_threshold, meta.class_choice_weights or None)
            energy = boundary_energy(logits[n + 1:n + 1 + MAP_CHANNELS], args.sigma)
            shown = (pred > 0).astype(np.uint8) if len(classes) == 2 else pred
            for m, e in variants:
                cut = split_nuclei(pred, distance, energy, replace(settings, marker_threshold=m), e, args.gated)
                evals[m, e].add(s.stem, s.labels, shown, s.instances, cut)
        for m, e in variants:
            summary = summarise(evals[m, e].report(), classes)
            results.setdefault(name, {})[f"{m} {e}"] = {k: summary[k] for k in ("nucleus_dice", "bpq", "f1", "aji")}
            r = results[name][f"{m} {e}"]
            print(f"{name:14s} ({len(samples)} images) marker {m:.2f} energy {str(e):5s}: Dice {r['nucleus_dice']:.4f} "
                  f"bPQ {r['bpq']:.4f} F1 {r['f1']:.4f} AJI {r['aji']:.4f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def markers_of(args, settings) -> list[float]:
    """The marker thresholds to try with the maps' energy: ``--markers``, or the model's own."""
    return [float(m) for m in args.markers.split(",")] if args.markers else [settings.marker_threshold]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("--minutes", type=float, default=70)
    t.add_argument("--steps", type=int, default=600, help="the cosine schedule's length")
    t.add_argument("--lr", type=float, default=0.0005)
    t.add_argument("--hv-weight", type=float, default=2.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--ema", type=float, default=0.0, help="keep the weights' moving average with this decay (0: off)")
    t.add_argument("--branch", action="store_true",
                   help="the shipped network frozen, the maps from a decoder branch of their own (from a copy of its decoder)")
    t.add_argument("--out", default="runs/hv")
    s = sub.add_parser("score")
    s.add_argument("--weights", help="a trial's weights (without: the default, its map channels untrained)")
    s.add_argument("--energy", default="0.1,0.2,0.3,0.5")
    s.add_argument("--sigma", type=float, default=1.0)
    s.add_argument("--gated", action="store_true", help="the watershed runs on the distance map with the boundaries cut in")
    s.add_argument("--markers", default="", help="marker thresholds to try with the energy (default: the model's)")
    s.add_argument("--sets", default=",".join(SETS))
    s.add_argument("--training-images", action="store_true", help="score training images (to choose), not held-out ones")
    s.add_argument("--groups", type=int, default=4, help="with --training-images: how many source images per set")
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--json")
    args = p.parse_args(argv)
    return train(args) if args.command == "train" else score(args)


if __name__ == "__main__":
    raise SystemExit(main())
