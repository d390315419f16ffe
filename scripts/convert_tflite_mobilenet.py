"""Convert an ImageNet MobileNetV2 from a quantised TFLite file into encoder weights (.safetensors).

    .venv/bin/pip install tflite      # the flatbuffer schema bindings (brings flatbuffers); no TensorFlow
    python scripts/convert_tflite_mobilenet.py ../shared/weights/mobilenet_v2_1.0_224_quant.tflite \
        --out runs/imagenet/mobilenet_v2_imagenet.safetensors

Then ``model: {encoder: mobilenet_v2, encoder_weights: <that file>}`` starts a U-Net from ImageNet
(configs/imagenet_start.yaml). The file holds torchvision's MobileNetV2 names (``features.*``,
which is smp's ``mobilenet_v2`` encoder) plus ``classifier.1.*`` (ImageNet's 1001 classes,
index 0 = background), which the encoder loader ignores and the converter's test uses.

What the conversion does, layer by layer (52 backbone convolutions, then the classifier):
dequantise ``(q - zero_point) * scale`` (one scale per tensor in the TF1 uint8 file, one per
output channel in the TF2 int8 file), reorder TF's OHWI to PyTorch's OIHW (depthwise 1HWC to
C1HW), and undo the batch-norm folding as far as a trainer needs: each BatchNorm gets the
folded bias, and statistics such that in eval mode it adds exactly that bias. With
``--batchnorm identity`` those are mean 0, var 1 - eps, scale 1. The default, ``calibrated``,
instead measures each convolution's per-channel output mean m and variance v on a few natural
photographs (skimage.data, never the two test images) and stores mean m, var v, scale
sqrt(v + eps), bias (folded bias + m): the same function in eval mode, and in train mode, where
BatchNorm normalises by the batch's own statistics, close to it (identity statistics would
rescale every channel to unit variance there: the network then answers the same for any image).

The network expects RGB in [-1, 1] (x / 127.5 - 1), i.e. the trainer's
``normalization: {mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}`` on [0, 1] pixels. TF pads its
stride-2 "SAME" convolutions asymmetrically (nothing before, one after), PyTorch symmetrically;
the converted weights are the same either way (the test measures the difference).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RELU6 = 3  # tflite.ActivationFunctionType.RELU6
SAME = 0  # tflite.Padding.SAME
BN_EPS = 1e-5  # torchvision's MobileNetV2 BatchNorm2d
BACKBONE_CONVS = 52


class ConversionError(ValueError):
    """The file is not the MobileNetV2 this converter knows how to map."""


@dataclass
class Conv:
    """One convolution of the TFLite graph, dequantised and in PyTorch's layout."""

    name: str
    weight: np.ndarray  # float32 OIHW; depthwise C1HW
    bias: np.ndarray  # float32, the batch norm folded in
    stride: int
    depthwise: bool
    relu6: bool
    same_padding: bool


def _tflite():
    try:
        import tflite
    except ImportError:
        sys.exit("This converter needs the 'tflite' package (flatbuffer schema bindings): pip install tflite")
    return tflite


def dequantise(raw: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int) -> np.ndarray:
    """``(q - zero_point) * scale``, one scale per tensor or one per channel along ``axis``."""
    q = raw.astype(np.float64)
    if scale.size > 1:
        shape = [1] * q.ndim
        shape[axis] = scale.size
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    return ((q - zero_point) * scale).astype(np.float32)


def read_tensor(model, graph, index: int) -> np.ndarray:
    """The constant tensor ``index`` of the graph, dequantised, in TF's layout."""
    tflite = _tflite()
    tensor = graph.Tensors(index)
    dtypes = {tflite.TensorType.UINT8: np.uint8, tflite.TensorType.INT8: np.int8,
              tflite.TensorType.INT32: np.int32, tflite.TensorType.FLOAT32: np.float32}
    if tensor.Type() not in dtypes:
        raise ConversionError(f"tensor '{tensor.Name().decode()}' has TFLite type {tensor.Type()}, not one we read.")
    data = model.Buffers(tensor.Buffer()).DataAsNumpy()
    raw = np.frombuffer(data.tobytes(), dtype=dtypes[tensor.Type()]).reshape(tensor.ShapeAsNumpy())
    quant = tensor.Quantization()
    if quant is None or quant.ScaleLength() == 0:
        return raw.astype(np.float32)
    return dequantise(raw, quant.ScaleAsNumpy(), quant.ZeroPointAsNumpy(), quant.QuantizedDimension())


def read_convolutions(path: Path) -> list[Conv]:
    """Every CONV_2D and DEPTHWISE_CONV_2D of the file, in graph order (the last is the classifier)."""
    tflite = _tflite()
    model = tflite.Model.GetRootAsModel(path.read_bytes(), 0)
    graph = model.Subgraphs(0)
    convs = []
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        code = model.OperatorCodes(op.OpcodeIndex())
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        if builtin == tflite.BuiltinOperator.CONV_2D:
            options, depthwise = tflite.Conv2DOptions(), False
        elif builtin == tflite.BuiltinOperator.DEPTHWISE_CONV_2D:
            options, depthwise = tflite.DepthwiseConv2DOptions(), True
        else:
            continue
        table = op.BuiltinOptions()
        options.Init(table.Bytes, table.Pos)
        inputs = op.InputsAsNumpy()
        weight = read_tensor(model, graph, inputs[1])
        # OHWI -> OIHW; depthwise 1HWC -> C1HW (the same transpose puts C first)
        weight = weight.transpose(3, 0, 1, 2) if depthwise else weight.transpose(0, 3, 1, 2)
        convs.append(Conv(
            name=graph.Tensors(inputs[1]).Name().decode().split(";")[0],
            weight=np.ascontiguousarray(weight),
            bias=read_tensor(model, graph, inputs[2]),
            stride=options.StrideH(), depthwise=depthwise,
            relu6=options.FusedActivationFunction() == RELU6,
            same_padding=options.Padding() == SAME,
        ))
    return convs


def torchvision_mobilenet(num_classes: int):
    import torchvision

    return torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes)


def conv_bn_pairs(net) -> list:
    """(Conv2d, BatchNorm2d) of torchvision's MobileNetV2 ``features``, in forward order."""
    from torch import nn

    modules = list(net.features.modules())
    pairs = [(m, modules[i + 1]) for i, m in enumerate(modules) if isinstance(m, nn.Conv2d)]
    if not all(isinstance(bn, nn.BatchNorm2d) for _, bn in pairs):
        raise ConversionError("torchvision's MobileNetV2 no longer has a BatchNorm after each convolution.")
    return pairs


def followed_by_relu6(net) -> list[bool]:
    """For each convolution of ``features``: does a ReLU6 follow its BatchNorm (the projections: no)?"""
    from torch import nn

    modules = list(net.features.modules())
    return [i + 2 < len(modules) and isinstance(modules[i + 2], nn.ReLU6)
            for i, m in enumerate(modules) if isinstance(m, nn.Conv2d)]


def build_network(convs: list[Conv]):
    """torchvision's MobileNetV2 holding the converted weights, BatchNorms as identity + folded bias."""
    import torch

    if len(convs) != BACKBONE_CONVS + 1:
        raise ConversionError(f"expected {BACKBONE_CONVS} backbone convolutions + the classifier, found {len(convs)}.")
    classifier = convs[-1]
    net = torchvision_mobilenet(num_classes=classifier.weight.shape[0])
    with torch.no_grad():
        for src, (conv, bn), relu6 in zip(convs, conv_bn_pairs(net), followed_by_relu6(net)):
            if (tuple(conv.weight.shape), conv.stride[0], relu6, True) != (
                    src.weight.shape, src.stride, src.relu6, src.same_padding):
                raise ConversionError(
                    f"'{src.name}' ({src.weight.shape}, stride {src.stride}, ReLU6 {src.relu6}, SAME "
                    f"{src.same_padding}) does not fit torchvision's ({tuple(conv.weight.shape)}, stride "
                    f"{conv.stride[0]}, ReLU6 {relu6}, padded): not a MobileNetV2 1.0?")
            conv.weight.copy_(torch.from_numpy(src.weight))
            bn.weight.fill_(1.0)
            bn.bias.copy_(torch.from_numpy(src.bias))
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - BN_EPS)  # sqrt(var + eps) = 1: BN adds the bias, nothing else
        linear = net.classifier[1]
        linear.weight.copy_(torch.from_numpy(classifier.weight.reshape(linear.weight.shape)))
        linear.bias.copy_(torch.from_numpy(classifier.bias))
    return net.eval()


def imagenet_input(image: np.ndarray, size: int = 224):
    """RGB uint8 -> 1x3xHxW in [-1, 1]: the central square, resized (as the TF models were fed)."""
    import torch
    from skimage.transform import resize

    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[top:top + side, left:left + side, :3]
    pixels = resize(square, (size, size), anti_aliasing=True, preserve_range=True) / 127.5 - 1.0
    return torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1)[None]


def calibration_batch():
    """Natural photographs (not the test's chelsea and coffee), whole and as two crops each."""
    import torch
    from skimage import data

    images = [data.astronaut(), data.rocket(), data.stereo_motorcycle()[0], data.immunohistochemistry()]
    crops = []
    for image in images:
        h, w = image.shape[:2]
        crops += [image, image[: h // 2 + h // 4, : w // 2 + w // 4], image[h // 4:, w // 4:]]
    return torch.cat([imagenet_input(c) for c in crops])


def calibrate_batchnorm(net, batch) -> None:
    """Give each BatchNorm its convolution's per-channel output statistics on ``batch`` (mean m,
    variance v), keeping the function: (y - m) / sqrt(v + eps) * sqrt(v + eps) + (bias + m) = y + bias,
    in eval mode exactly and in train mode as far as the batch's statistics match m and v."""
    import torch

    stats = {}

    def record(conv, _inputs, output):
        stats[conv] = (output.mean(dim=(0, 2, 3)), output.var(dim=(0, 2, 3), unbiased=False))

    pairs = conv_bn_pairs(net)
    hooks = [conv.register_forward_hook(record) for conv, _ in pairs]
    with torch.no_grad():
        net.eval()(batch)
        for conv, bn in pairs:
            mean, var = stats[conv]
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            bn.weight.copy_((var + BN_EPS).sqrt())  # undoes BN's own division, in both modes
            bn.bias.add_(mean)
    for hook in hooks:
        hook.remove()


def convert(source: Path, batchnorm: str = "calibrated"):
    """torchvision's MobileNetV2 (eval mode) with the weights of the TFLite file ``source``."""
    net = build_network(read_convolutions(source))
    if batchnorm == "calibrated":
        calibrate_batchnorm(net, calibration_batch())
    return net


def tf_same_padding(net):
    """Pad ``net``'s stride-2 convolutions as TF's "SAME" does (0 before, 1 after; even inputs),
    instead of PyTorch's 1 on each side. For checking the conversion only: the smp encoder
    that trains from these weights keeps PyTorch's symmetric padding."""
    import torch.nn.functional as F

    for conv, _ in conv_bn_pairs(net):
        if conv.stride[0] == 2:
            pad = conv.kernel_size[0] - 2  # 3x3: (0, 1)
            conv.padding = (0, 0)
            conv.register_forward_pre_hook(lambda _m, args, p=pad: (F.pad(args[0], (0, p + 1, 0, p + 1)),))
    return net


def photographs():
    """The check's two photographs, as the network's input: a tabby cat and a cup of espresso."""
    from skimage import data

    return {"chelsea": imagenet_input(data.chelsea()), "coffee": imagenet_input(data.coffee())}


def top5(net, image) -> list[tuple[int, float]]:
    """The 5 most probable ImageNet-1k classes (0-999; a 1001-class model's background dropped
    from the numbering) with their probabilities, in eval mode."""
    import torch

    with torch.no_grad():
        probs = net.eval()(image).softmax(1)[0]
    offset = probs.numel() - 1000  # TF1 slim models: index 0 = background
    values, indices = probs.topk(5)
    return [(int(i) - offset, float(v)) for i, v in zip(indices, values)]


def print_check(net) -> None:
    import copy

    import torchvision

    names = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
    padded = tf_same_padding(copy.deepcopy(net))
    for name, image in photographs().items():
        for padding, model in (("PyTorch symmetric", net), ("TF SAME", padded)):
            ranks = ", ".join(f"{i} {names[i]} {p:.3f}" if i >= 0 else f"background {p:.3f}" for i, p in top5(model, image))
            print(f"  {name}, {padding} padding: {ranks}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tflite", type=Path, help="a MobileNetV2 1.0 / 224 .tflite file (uint8 or int8)")
    parser.add_argument("--out", type=Path, required=True, help="the .safetensors to write")
    parser.add_argument("--batchnorm", choices=("calibrated", "identity"), default="calibrated",
                        help="BatchNorm statistics (see above); both give the same eval-mode network")
    args = parser.parse_args(argv)
    from safetensors.torch import save_file

    if not args.tflite.is_file():
        parser.error(f"{args.tflite} does not exist.")
    try:
        net = convert(args.tflite, args.batchnorm)
    except ConversionError as exc:
        parser.error(f"{args.tflite}: {exc}")
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    metadata = {"source": args.tflite.name, "batchnorm": args.batchnorm, "input": "RGB in [-1, 1]",
                "classes": str(net.classifier[1].out_features),
                "normalization": json.dumps({"mean": [0.5] * 3, "std": [0.5] * 3})}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out), metadata=metadata)
    print(f"{args.out}: {len(state)} tensors from {args.tflite.name} (batchnorm {args.batchnorm})")
    print("Top 5 of the converted network, inputs in [-1, 1]:")
    print_check(net)
    return 0


if __name__ == "__main__":
    sys.exit(main())
