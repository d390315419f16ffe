"""The napari face of napari-medseg: reader, sample data, widgets, demo. Thin: the work is in the core."""

import sys

# Importing Triton (which torchvision pulls in through torch._dynamo) after napari has
# created an OpenGL context segfaults under Mesa's software renderer (llvmpipe): both
# carry their own LLVM. Inference and training here never use torch.compile, so inside
# the viewer we make `import triton` fail cleanly instead; torch then runs without it.
if "triton" not in sys.modules:
    sys.modules["triton"] = None  # type: ignore[assignment]
