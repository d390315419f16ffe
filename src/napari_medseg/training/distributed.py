"""DistributedDataParallel over several GPUs or machines, started by ``torchrun``.

``torchrun --nproc_per_node N -m napari_medseg train CONFIG.yaml`` sets ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK``; ``train`` then joins the process group (NCCL on CUDA, gloo on
CPU), shares each epoch's training crops out among the ranks (``setup.EpochSampler``: the
crops of a single-process run, not as many per rank), shards validation images without
padding and sums the confusion matrices, so every rank takes the same decisions.
Only rank 0 reports progress and writes files.
"""

from __future__ import annotations

import atexit
import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_min_flag(self, ok: bool, device) -> bool:
        """True only if ``ok`` on every rank."""
        if not self.enabled:
            return ok
        flag = torch.tensor([1 if ok else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def gather_ints(self, value: int, device) -> list[int]:
        if not self.enabled:
            return [value]
        mine = torch.tensor([value], dtype=torch.int64, device=device)
        out = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(out, mine)
        return [int(t.item()) for t in out]

    def sync_buffers(self, model: torch.nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics), e.g. before validating."""
        if self.enabled:
            for buf in model.buffers():
                dist.broadcast(buf, 0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed(device_name: str) -> tuple[DistContext, str]:
    """Join the process group when launched by torchrun; returns the context and the device to use."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(), device_name
    if "RANK" not in os.environ:  # a scheduler's WORLD_SIZE without torchrun: 'KeyError: RANK' had been all
        from ..devices import DeviceError

        raise DeviceError(f"WORLD_SIZE is {world} but RANK is not set: start several processes with torchrun "
                          "(torchrun --nproc_per_node N -m napari_medseg train CONFIG.yaml), or unset WORLD_SIZE "
                          "for one process.")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda") or str(device_name).startswith("cuda")
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        _check_gpu_for(local_rank, device_name)
        torch.cuda.set_device(local_rank)
        device_name = f"cuda:{local_rank}"
    elif device_name == "auto":
        device_name = "cpu"
    if dist.is_initialized() and dist.get_backend() != backend:  # another device than the last run's
        dist.destroy_process_group()
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
        atexit.register(_end_process_group)
    return DistContext(world, rank, local_rank, backend), device_name


def _check_gpu_for(local_rank: int, device_name: str) -> None:
    """Each process takes the GPU of its local rank: refuse, with a message, one that is not there
    (torch's own error was a traceback: 'Found no NVIDIA driver' or 'invalid device ordinal')."""
    from ..devices import DeviceError

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise DeviceError(f"Device '{device_name}' requested but this machine has no CUDA GPU; for processes on "
                          "the CPU (gloo) set device=cpu.")
    if local_rank >= count:
        raise DeviceError(f"Process {local_rank} on this machine needs GPU {local_rank}, but it has {count}: "
                          f"start at most {count} (torchrun --nproc_per_node {count}).")


def _end_process_group() -> None:
    """The process group lives as long as the process: stages and repeats call ``train`` again,
    and making the group anew for each raced (a rank reached the new group's gloo port before it
    was open: 'Gloo connectFullMesh failed ... Connection refused', half the 2-repeat runs here)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def parameter_hash(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter's bytes, in name order (buffers excluded: BatchNorm running
    statistics are per rank in DDP; rank 0's are the ones saved)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()
