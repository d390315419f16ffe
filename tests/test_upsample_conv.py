"""The U-Net decoder's upsampling convolutions computed at the low resolution: the same outputs as
smp's block (to float rounding), on random blocks and on the shipped default with a real tile."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoderBlock

from napari_medseg.models.upsample_conv import PolyphaseUnetBlock, _folded_conv, phase_kernels, polyphase_unet_decoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _random_block(in_channels: int, skip_channels: int, out_channels: int, seed: int = 0) -> UnetDecoderBlock:
    torch.manual_seed(seed)
    block = UnetDecoderBlock(in_channels, skip_channels, out_channels)
    with torch.no_grad():  # batch norm that is not the identity, so folding it is on trial too
        for bn in (block.conv1[1], block.conv2[1]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return block.eval()


def test_phase_kernels_sum_the_taps_each_output_phase_sees():
    weight = torch.arange(9.0).reshape(1, 1, 3, 3)  # rows [0 1 2], [3 4 5], [6 7 8]
    kernels = phase_kernels(weight)
    assert kernels.shape == (4, 1, 2, 2)
    # phase (0, 0): low rows i-1 (tap row 0) and i (tap rows 1 + 2), the same for columns
    torch.testing.assert_close(kernels[0, 0], torch.tensor([[0.0, 1 + 2], [3 + 6, 4 + 5 + 7 + 8]]))
    # phase (1, 1): low rows i (tap rows 0 + 1) and i + 1 (tap row 2)
    torch.testing.assert_close(kernels[3, 0], torch.tensor([[0 + 1 + 3 + 4, 2 + 5], [6 + 7, 8.0]]))
    assert float(kernels.sum()) == 4 * float(weight.sum())  # every tap lands once in each phase


@pytest.mark.parametrize("skip_channels", [16, 0])
def test_block_gives_the_same_outputs_as_smp(skip_channels):
    block = _random_block(32, skip_channels, 24)
    conv1 = _folded_conv(block.conv1)  # conv + batch norm + ReLU, the norm folded in
    assert conv1 is not None
    fast = PolyphaseUnetBlock(copy.deepcopy(block), conv1, up_channels=32).eval()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 32, 7, 9, generator=generator)  # odd, unequal sides: borders on every side
    skip = torch.randn(2, skip_channels, 14, 18, generator=generator) if skip_channels else None
    with torch.inference_mode():
        expected = block(x, 14, 18, skip)
        torch.testing.assert_close(fast(x, 14, 18, skip), expected, rtol=1e-4, atol=1e-4)
        # the graph form (what the ONNX export records) too
        z = fast.phases(x)
        graph = fast._interleaved(z, 7, 9) + (fast.skip(skip) if skip is not None else 0)
        torch.testing.assert_close(fast.attention2(fast.conv2(torch.relu(graph))), expected, rtol=1e-4, atol=1e-4)
        # any other size than a doubling runs the original block
        other = torch.randn(2, skip_channels, 15, 18, generator=generator) if skip_channels else None
        torch.testing.assert_close(fast(x, 15, 18, other), block(x, 15, 18, other))


def test_only_eval_mode_and_only_blocks_it_knows(tiny_checkpoint):
    from napari_medseg.models.checkpoint import load_checkpoint

    model, _ = load_checkpoint(tiny_checkpoint)
    with pytest.raises(ValueError, match="eval mode"):
        polyphase_unet_decoder(model.train())
    attention = smp_unet(decoder_attention_type="scse").eval()
    assert polyphase_unet_decoder(attention, min_up_channels=1) == 0  # attention on the joined input: left alone
    assert not any(isinstance(m, PolyphaseUnetBlock) for m in attention.modules())


def smp_unet(**kwargs):
    import segmentation_models_pytorch as smp

    return smp.Unet("resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(32, 16, 8), classes=3,
                    **kwargs)


def test_the_shipped_default_on_a_real_tile(consep):
    """Four of its five decoder blocks rewritten (the last, 32 channels at full resolution, is left:
    there it measured slower); the logits of a real CoNSeP tile agree to float rounding."""
    from napari_medseg.inference.segmenter import resolve_model_path
    from napari_medseg.io import read_image
    from napari_medseg.models.checkpoint import load_checkpoint

    model, meta = load_checkpoint(resolve_model_path("default"))
    model.eval()
    fast = copy.deepcopy(model)
    assert polyphase_unet_decoder(fast) == 4
    assert not isinstance(fast.decoder.blocks[4], PolyphaseUnetBlock)
    image = read_image(consep / "images" / "train_1_005.png")[:128, :128, :3].astype(np.float32) / 255
    x = torch.from_numpy(image * 2 - 1).permute(2, 0, 1)[None].contiguous()  # the default's [-1, 1] input
    with torch.inference_mode():
        expected, got = model(x), fast(x)
    assert float((got - expected).abs().max()) < 1e-3 * (1 + float(expected.abs().max()))
    classes = len(meta.classes)
    assert bool((got[:, :classes].argmax(1) == expected[:, :classes].argmax(1)).all())
