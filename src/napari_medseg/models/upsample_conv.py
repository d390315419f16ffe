"""A U-Net decoder block's 2x nearest upsampling and first 3x3 convolution, computed at the low resolution.

The block doubles its input by nearest-neighbour upsampling, joins the skip connection and
convolves (3x3). On the upsampled half of that input every output pixel's 3x3 window covers
only a 2x2 neighbourhood of low-resolution pixels, with some repeated: the same sums come from
four 2x2 convolutions of the low-resolution map, one per output phase (row and column parity),
interleaved (``pixel_shuffle``). That is 4 instead of 9 multiply-adds per input channel and
output pixel, and no upsampled copy is made. In the MobileNetV2 U-Net the upsampled inputs are
nearly all of the decoder's first convolutions, which are most of the network's arithmetic.

The rewrite is exact up to float rounding (the 2x2 kernels are sums of the 3x3 one's taps), is
for inference only, and applies to smp's ``UnetDecoderBlock`` (nearest mode, no attention on the
joined input); ``models.optimise`` uses it for PyTorch and for the ONNX export, and checks the
result against the original network like its other rewrites.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

# Blocks with fewer upsampled channels are left as they are: there (the MobileNetV2 U-Net's last
# block, 32 channels at full resolution) the time goes in moving memory, not in multiply-adds, and
# the interleaving costs more than it saves (measured: 25 -> 45 ms a batch of 4 x 256²; blocks
# 0-3, 1280 to 64 channels, 137 -> 95 ms).
MIN_UP_CHANNELS = 64
# Which rows of the 3x3 kernel reach each of the two low-resolution rows an output row sees:
# an even output row 2i sees rows i-1 (tap 0) and i (taps 1, 2); an odd one 2i+1 rows i (taps 0, 1)
# and i+1 (tap 2). The same holds for columns.
_PHASE_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]],
                            [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])


def phase_kernels(weight: torch.Tensor) -> torch.Tensor:
    """``(4 * out, in, 2, 2)`` kernels from a ``(out, in, 3, 3)`` one: for output phase ``(a, b)``
    (block ``2a + b``), the 2x2 kernel that, over low-resolution rows ``i - 1 + a .. i + a`` and
    columns ``j - 1 + b .. j + b``, sums as the 3x3 kernel does over the upsampled map at ``(2i + a, 2j + b)``."""
    taps = _PHASE_TAPS.to(weight)
    blocks = [torch.einsum("rk,oikl,sl->oirs", taps[a], weight, taps[b]) for a in (0, 1) for b in (0, 1)]
    return torch.cat(blocks, dim=0)


def _folded_conv(conv_relu: nn.Sequential) -> nn.Conv2d | None:
    """The 3x3 convolution of smp's Conv2dReLU (conv, batch norm or Identity, ReLU) with the batch
    norm folded in, or None if the block is laid out otherwise."""
    parts = list(conv_relu.children())
    if len(parts) != 3 or type(parts[0]) is not nn.Conv2d or type(parts[2]) is not nn.ReLU:
        return None
    conv, norm = parts[0], parts[1]
    if type(norm) is nn.BatchNorm2d:
        if not norm.track_running_stats or norm.running_mean is None:
            return None
        conv = fuse_conv_bn_eval(conv.eval(), norm.eval())
    elif type(norm) is not nn.Identity:
        return None
    if conv.kernel_size != (3, 3) or conv.padding != (1, 1) or conv.stride != (1, 1) or conv.dilation != (1, 1) \
            or conv.groups != 1 or conv.padding_mode != "zeros":
        return None
    return conv


def _is_identity_attention(module: nn.Module) -> bool:
    inner = getattr(module, "attention", module)
    return type(inner) is nn.Identity


class PolyphaseUnetBlock(nn.Module):
    """An smp ``UnetDecoderBlock`` whose upsampling and first convolution run at the low resolution.

    Same call as the block it replaces. Any other size than an exact doubling (smp asks for
    inputs divisible by the output stride, so it does not occur there) runs the original block.
    """

    def __init__(self, block: nn.Module, conv1: nn.Conv2d, up_channels: int):
        super().__init__()
        weight, bias = conv1.weight.detach(), conv1.bias
        bias = weight.new_zeros(weight.shape[0]) if bias is None else bias.detach()
        self.out_channels, self.up_channels = weight.shape[0], up_channels
        self.skip_channels = weight.shape[1] - up_channels
        like = {"device": weight.device, "dtype": weight.dtype}
        self.phases = nn.Conv2d(up_channels, 4 * self.out_channels, 2, padding=1, bias=self.skip_channels == 0, **like)
        with torch.no_grad():
            self.phases.weight.copy_(phase_kernels(weight[:, :up_channels]))
            if self.skip_channels == 0:
                self.phases.bias.copy_(bias.repeat(4))
        self.skip = None
        if self.skip_channels:
            self.skip = nn.Conv2d(self.skip_channels, self.out_channels, 3, padding=1, bias=True, **like)
            with torch.no_grad():
                self.skip.weight.copy_(weight[:, up_channels:])
                self.skip.bias.copy_(bias)
        self.conv2, self.attention2 = block.conv2, block.attention2
        self.original = block  # for any other size than a doubling

    def forward(self, feature_map: torch.Tensor, target_height: int, target_width: int,
                skip_connection: torch.Tensor | None = None) -> torch.Tensor:
        height, width = feature_map.shape[-2:]
        if (target_height != 2 * height or target_width != 2 * width or feature_map.shape[1] != self.up_channels
                or (skip_connection is None) != (self.skip is None)):
            return self.original(feature_map, target_height, target_width, skip_connection)
        z = self.phases(feature_map)  # (N, 4 * out, H + 1, W + 1): 2x2 windows of the zero-padded map
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            y = self._interleaved(z, height, width)  # out of place: a graph has no views to add into
            if self.skip is not None:
                y = y + self.skip(skip_connection)
        else:
            y = self._added_into_skip(z, skip_connection, height, width)
        y = self.conv2(torch.relu(y))
        return self.attention2(y)

    def _interleaved(self, z: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The four phases as one map (``pixel_shuffle``: an ONNX DepthToSpace)."""
        c = self.out_channels
        # output phase (a, b) = rows 2i + a, columns 2j + b; its windows start at row a, column b of z
        y = torch.stack([z[:, 0:c, :height, :width], z[:, c:2 * c, :height, 1:],
                         z[:, 2 * c:3 * c, 1:, :width], z[:, 3 * c:, 1:, 1:]], dim=2)
        return F.pixel_shuffle(y.reshape(y.shape[0], 4 * c, height, width), 2)

    def _added_into_skip(self, z: torch.Tensor, skip_connection: torch.Tensor | None, height: int,
                         width: int) -> torch.Tensor:
        """The same, added in place into the skip convolution's output: one pass over the output
        instead of an interleaved copy and a sum (PyTorch)."""
        c = self.out_channels
        if self.skip is not None:
            y = self.skip(skip_connection)
        else:
            y = z.new_zeros((z.shape[0], c, 2 * height, 2 * width))
        phases = y.view(y.shape[0], c, height, 2, width, 2)
        for a in (0, 1):
            for b in (0, 1):
                block = 2 * a + b
                phases[:, :, :, a, :, b] += z[:, block * c:(block + 1) * c, a:a + height, b:b + width]
        return y


def polyphase_unet_decoder(model: nn.Module, min_up_channels: int = MIN_UP_CHANNELS) -> int:
    """Replace, in place, each smp ``UnetDecoderBlock`` of ``model`` (eval mode) that upsamples by
    nearest neighbour, has no attention on its joined input and at least ``min_up_channels``
    upsampled channels by a ``PolyphaseUnetBlock``. Returns how many were replaced."""
    if model.training:
        raise ValueError("polyphase_unet_decoder needs a model in eval mode (it bakes in batch norm).")
    replaced = 0
    for parent in list(model.modules()):
        for name, block in list(parent._modules.items()):
            if type(block).__name__ != "UnetDecoderBlock" or getattr(block, "interpolation_mode", None) != "nearest":
                continue
            if not _is_identity_attention(block.attention1):
                continue
            conv1 = _folded_conv(block.conv1)
            if conv1 is None:
                continue
            up_channels = _up_channels(model, block)
            if up_channels is None or up_channels < min_up_channels or up_channels > conv1.in_channels:
                continue
            parent._modules[name] = PolyphaseUnetBlock(block, conv1, up_channels)
            replaced += 1
    return replaced


def _up_channels(model: nn.Module, block: nn.Module) -> int | None:
    """How many of ``block``'s first-convolution inputs are the upsampled map (the rest: the skip)."""
    decoder = getattr(model, "decoder", None)
    blocks = list(getattr(decoder, "blocks", []))
    if block not in blocks:
        return None
    i = blocks.index(block)
    if i == 0:
        # the first block takes the encoder's deepest features (through an optional centre block)
        channels = getattr(getattr(model, "encoder", None), "out_channels", None)
        return None if not channels else int(channels[-1])
    previous = blocks[i - 1]
    conv2 = previous.conv2 if hasattr(previous, "conv2") else None
    first = next((m for m in conv2.modules() if isinstance(m, nn.Conv2d)), None) if conv2 is not None else None
    return None if first is None else int(first.out_channels)
