"""One place that turns a ``ModelConfig`` into a network, with no download ever."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .config import (ARCHITECTURES, SMP_ARCHITECTURES, TESTED_ENCODERS, ModelConfig, ModelConfigError,
                     encoder_depth_error)
from .weights import load_local_encoder_weights

if TYPE_CHECKING:  # torch loads with the first model built
    from torch import nn


def build_model(config: ModelConfig, keep_unused: bool = False) -> nn.Module:
    """The network of ``config``. The smp encoder stages that an ``encoder_depth`` below 5 leaves
    unused (smp builds all five) are removed (``remove_unused_encoder_modules``), unless
    ``keep_unused`` (the network as it was built before: an older resume file's parameter order)."""
    arch = config.architecture.lower()
    if config.num_classes < 1 or config.in_channels < 1:
        raise ModelConfigError("num_classes and in_channels must be at least 1.")
    if arch == "vanilla_unet":
        from .networks.vanilla_unet import VanillaUNet

        return VanillaUNet(config.in_channels, config.out_channels, config.base_channels, config.depth, config.dropout)
    if arch == "attention_res_unet":
        from .networks.attention_res_unet import AttentionResUNet

        return AttentionResUNet(config.in_channels, config.out_channels, config.base_channels, config.depth, config.dropout)
    if arch not in SMP_ARCHITECTURES:
        raise ModelConfigError(f"Unknown architecture '{config.architecture}'. Choose one of: {', '.join(ARCHITECTURES)}.")
    depth_error = encoder_depth_error(config)
    if depth_error:
        raise ModelConfigError(depth_error)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # fail fast rather than retry a download
    import segmentation_models_pytorch as smp

    if config.encoder not in smp.encoders.get_encoder_names():
        raise ModelConfigError(f"Unknown encoder '{config.encoder}'. Tested: {', '.join(TESTED_ENCODERS)}.")
    _check_extra(config, getattr(smp, SMP_ARCHITECTURES[arch]))
    kwargs = dict(config.extra)
    if arch in ("unet", "unetplusplus"):
        if config.decoder_channels is not None:
            kwargs["decoder_channels"] = list(config.decoder_channels)
        elif config.encoder_depth != 5:
            kwargs["decoder_channels"] = [256, 128, 64, 32, 16][-config.encoder_depth:]
    if arch == "fpn":
        # smp's FPN merges its 4 finest pyramid levels, at stride 2**(depth-3), then upsamples
        # by a fixed 4 (right for depth 5 only); match it so output size == input size.
        kwargs.setdefault("upsampling", 2 ** (config.encoder_depth - 3))
    if arch != "deeplabv3plus":
        kwargs["encoder_depth"] = config.encoder_depth
    try:
        model = smp.create_model(
            SMP_ARCHITECTURES[arch], encoder_name=config.encoder, encoder_weights=None,
            in_channels=config.in_channels, classes=config.out_channels, **kwargs,
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelConfigError(f"Cannot build {arch} with encoder {config.encoder}: {exc}") from exc
    if not keep_unused and arch != "deeplabv3plus" and config.encoder_depth < 5:
        remove_unused_encoder_modules(model, config.in_channels)
    if config.encoder_weights:
        load_local_encoder_weights(model, config.encoder_weights)
    return model


# set from the config's own fields, never through model.extra
OWN_KEYWORDS = ("encoder_name", "encoder_weights", "in_channels", "classes", "encoder_depth")


def _check_extra(config: ModelConfig, network: type) -> None:
    """``model.extra`` names only keyword arguments of the smp network: smp takes any keyword
    and drops the unknown, so a misspelt 'decoder_atention_type' had built a U-Net without it."""
    import inspect

    named = [p.name for p in inspect.signature(network).parameters.values()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in OWN_KEYWORDS]
    unknown = sorted(set(config.extra) - set(named))
    if unknown:
        raise ModelConfigError(f"model.extra: {network.__name__} has no {', '.join(map(repr, unknown))}; "
                               f"its settings are {', '.join(named)}.")


# the names of the modules a network was built without (``remove_unused_encoder_modules``)
REMOVED_ATTRIBUTE = "medseg_removed_modules"


def remove_unused_encoder_modules(model: nn.Module, in_channels: int) -> list[str]:
    """Replace the encoder modules with weights that no forward pass calls by ``RemovedModule``.

    smp builds every encoder stage whatever ``encoder_depth`` says (a ResNet18 U-Net of depth 3
    carried layer3 and layer4: 42 of its checkpoint's 45.6 MB) and some encoders keep a head they
    never run (EfficientNet's ``_conv_head``). Which modules run is measured, not assumed: an
    eval-mode pass of a zero image through the encoder records the modules called (no random
    number is drawn, no statistic changes: a seed makes the same weights as before), and a second
    pass without the others must give the same features, else nothing is removed.
    Returns the removed modules' names (``encoder.layer3``, ...), also kept on the model as
    ``medseg_removed_modules`` so that loading drops their tensors from older files."""
    import torch

    from .removed import RemovedModule

    encoder = model.encoder
    called: set[str] = set()
    hooks = [module.register_forward_pre_hook(lambda _m, _i, name=name: called.add(name))
             for name, module in encoder.named_modules()]
    was_training = encoder.training
    encoder.eval()
    probe = torch.zeros(1, in_channels, 64, 64)
    try:
        with torch.no_grad():
            before = encoder(probe)
    except Exception:  # noqa: BLE001 - an encoder that cannot take the probe keeps every module
        encoder.train(was_training)
        return []
    finally:
        for hook in hooks:
            hook.remove()
    unused: list[str] = []
    for name, module in encoder.named_modules():
        if not name or any(name.startswith(done + ".") for done in unused):
            continue
        if any(c == name or c.startswith(name + ".") for c in called):
            continue  # it, or a module inside it, runs
        if next(module.parameters(), None) is None and next(module.buffers(), None) is None:
            continue  # nothing to save: leave it
        unused.append(name)
    originals = {}
    for name in unused:
        parent_name, _, child = name.rpartition(".")
        parent = encoder.get_submodule(parent_name) if parent_name else encoder
        originals[name] = (parent, child, parent._modules[child])
        parent._modules[child] = RemovedModule(f"encoder.{name}")
    try:
        with torch.no_grad():
            after = encoder(probe)
        same = len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(after, before))
    except (RuntimeError, AttributeError, TypeError):
        same = False  # a removed module's weights were used after all: keep everything
    if not same:
        for parent, child, module in originals.values():
            parent._modules[child] = module
        unused = []
    encoder.train(was_training)
    removed = tuple(f"encoder.{name}" for name in unused)
    setattr(model, REMOVED_ATTRIBUTE, removed)
    return list(removed)


def without_removed(state: dict, model: nn.Module) -> dict:
    """``state`` without the tensors of the modules ``model`` was built without (older files
    hold them: they were saved before those modules were removed)."""
    removed = getattr(model, REMOVED_ATTRIBUTE, ())
    if not removed:
        return state
    return {k: v for k, v in state.items() if not any(k.startswith(r + ".") for r in removed)}
