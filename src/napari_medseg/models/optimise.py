"""Inference-only model rewrites that keep the outputs (to float rounding) and save time."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .upsample_conv import polyphase_unet_decoder


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every eval-mode ``BatchNorm2d`` that directly follows a ``Conv2d`` into that conv.

    Batch norm at inference is a per-channel affine map, so it can live in the conv's weights
    and bias: one full pass over every activation less (about a fifth of a MobileNetV2 U-Net's
    CPU time). Pairs are found as consecutive children of a container (smp's Conv2dReLU,
    torchvision's Conv2dNormActivation, ResNet's downsample) or as ``convN``/``bnN`` siblings
    (ResNet blocks and stems). The model is changed in place and must not be trained
    afterwards. Returns the number of folded layers.
    """
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode (it bakes in the running statistics).")
    folded = 0
    for parent in list(model.modules()):
        names = list(parent._modules)
        pairs = list(zip(names, names[1:]))
        pairs += [(n, "bn" + n[4:]) for n in names if n.startswith("conv") and "bn" + n[4:] in parent._modules]
        for conv_name, bn_name in pairs:
            conv, bn = parent._modules.get(conv_name), parent._modules.get(bn_name)
            if (isinstance(conv, nn.Conv2d) and type(bn) is nn.BatchNorm2d and bn.track_running_stats
                    and bn.running_mean is not None and conv.out_channels == bn.num_features):
                parent._modules[conv_name] = fuse_conv_bn_eval(conv, bn)
                parent._modules[bn_name] = nn.Identity()
                folded += 1
    return folded


class ConvActivation(nn.Module):
    """A ``Conv2d`` and the ReLU/ReLU6 after it as one oneDNN call (CPU, inference only).

    oneDNN applies the activation while the convolution's output is still in cache, so the
    separate pass over every activation map disappears. Same weights, same kernels: outputs
    equal the pair's to float rounding.
    """

    def __init__(self, conv: nn.Conv2d, activation: nn.Module):
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), requires_grad=False)
        self.padding, self.stride = list(conv.padding), list(conv.stride)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        if isinstance(activation, nn.ReLU6):
            self.attr, self.scalars = "hardtanh", [0.0, 6.0]
        else:
            self.attr, self.scalars = "relu", []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._convolution_pointwise(x, self.weight, self.bias, self.padding, self.stride,
                                                       self.dilation, self.groups, self.attr, self.scalars, None)


def _onednn_fusion_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    except (AttributeError, RuntimeError):
        return False


def fuse_conv_activations(model: nn.Module) -> int:
    """Replace each ``Conv2d`` -> (``Identity``s left by folding) -> ``ReLU``/``ReLU6`` run inside
    an ``nn.Sequential`` by one ``ConvActivation``; returns how many were fused.

    Only plain sequential containers are touched, where the order of children is the order
    they run in (smp's Conv2dReLU, torchvision's Conv2dNormActivation); a block with its own
    ``forward`` (a ResNet block reuses one ReLU after the residual sum) is left alone. For a
    float32 model on the CPU, after ``fold_batchnorm``.
    """
    fused = 0
    for parent in list(model.modules()):
        if not isinstance(parent, nn.Sequential) or type(parent).forward is not nn.Sequential.forward:
            continue
        names = list(parent._modules)
        for i, name in enumerate(names):
            conv = parent._modules[name]
            if (type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or isinstance(conv.padding, str)
                    or conv.weight.dtype != torch.float32 or conv.weight.device.type != "cpu"):
                continue
            j = i + 1
            while j < len(names) and type(parent._modules[names[j]]) is nn.Identity:
                j += 1
            activation = parent._modules[names[j]] if j < len(names) else None
            if type(activation) not in (nn.ReLU, nn.ReLU6):
                continue
            parent._modules[name] = ConvActivation(conv, activation)
            parent._modules[names[j]] = nn.Identity()
            fused += 1
    return fused


def _on_cpu(model: nn.Module) -> bool:
    return all(p.device.type == "cpu" for p in model.parameters())


def _same_outputs(model: nn.Module, fast: nn.Module, check_input: torch.Tensor, channels_last: bool) -> bool:
    with torch.inference_mode():
        expected = model(check_input).float()
        got = fast(check_input.contiguous(memory_format=torch.channels_last) if channels_last else check_input).float()
    return torch.allclose(got, expected, rtol=1e-3, atol=1e-3 * (1.0 + float(expected.abs().max())))


def optimise_for_inference(model: nn.Module, channels_last: bool = True,
                           check_input: torch.Tensor | None = None, fuse_activations: bool = True) -> nn.Module:
    """A copy of ``model`` for inference: eval mode, batch norm folded, a U-Net decoder's upsampling
    convolutions run at the low resolution (``models.upsample_conv``), channels-last weights and,
    on the CPU where oneDNN is available, convolutions fused with their ReLU/ReLU6.

    With ``check_input``, the copy's output is compared with the original's: if it differs by
    more than float rounding (or cannot run), the copy without the decoder rewrite is tried,
    then the one without fusion, then the original (eval mode) is returned. A layout the
    rewrite rules misread can never change a prediction.
    """
    model.eval()
    folded = copy.deepcopy(model)
    with torch.no_grad():
        fold_batchnorm(folded)
    fuse = fuse_activations and _onednn_fusion_available()
    candidates = [folded]
    if fuse:
        fused = copy.deepcopy(folded)
        if fuse_conv_activations(fused):
            candidates.insert(0, fused)
    low_resolution = copy.deepcopy(folded)
    with torch.no_grad():  # measured faster on CPUs only: elsewhere the plain decoder stays
        if _on_cpu(folded) and polyphase_unet_decoder(low_resolution):
            if fuse:
                fuse_conv_activations(low_resolution)
            candidates.insert(0, low_resolution)
    if channels_last:
        for candidate in candidates:
            candidate.to(memory_format=torch.channels_last)
    if check_input is None:
        return candidates[0]
    for candidate in candidates:
        try:
            if _same_outputs(model, candidate, check_input, channels_last):
                return candidate
        except RuntimeError:  # e.g. a oneDNN build without the fused op
            continue
    return model
