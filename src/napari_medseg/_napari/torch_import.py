"""torch's compiler front end imported safely inside a viewer drawn by Mesa's software OpenGL.

``torch._dynamo`` (which torchvision and segmentation_models_pytorch import) imports Triton to
see whether it is installed, and importing Triton in a process that has already loaded Mesa's
LLVM (the llvmpipe renderer napari gets under Xvfb or without a GPU driver) segfaults: both
bring their own LLVM. Checked with torch 2.14, Triton 3.8 and Mesa's libLLVM-15 under Xvfb:
still so; Triton imported *before* the viewer is fine.

This plugin never uses ``torch.compile``. So, only in such a process and only while
``torch._dynamo`` is first imported, ``import triton`` fails cleanly and torch records that it
runs without Triton. ``sys.modules`` is restored at once: nothing outside that one import
sees a change (an earlier version hid Triton for the whole napari session).
"""

from __future__ import annotations

import sys


def system_llvm_loaded() -> bool:
    """Whether a shared libLLVM (Mesa's llvmpipe brings one) is mapped into this process."""
    try:
        with open("/proc/self/maps") as maps:
            return any("libLLVM" in line for line in maps)
    except OSError:  # not Linux: no Mesa llvmpipe to clash with
        return False


def import_torch_dynamo() -> None:
    """Import ``torch._dynamo`` now (once), with Triton hidden only if it would crash."""
    if "torch._dynamo" in sys.modules:
        return
    hide = "triton" not in sys.modules and system_llvm_loaded()
    if hide:
        sys.modules["triton"] = None  # type: ignore[assignment]  # `import triton` -> ImportError
    try:
        import torch._dynamo  # noqa: F401
    finally:
        if hide and sys.modules.get("triton", False) is None:
            del sys.modules["triton"]
