"""Distributed helpers: where this process runs (torchrun's rank, world size and device), the gradient all-reduce,
the start from rank 0's weights, and the NaN guard that stops every rank together.

torch is imported inside the functions that use it: a single process's :class:`DistEnv` (``DistEnv()``) needs none,
so the TF-IDF baseline, which hands one to :mod:`train.distill`, runs without importing torch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from core.config import RunConfig
from core.errors import TrainingError


@dataclass
class DistEnv:
    """Where this process runs: rank / world size (torchrun), local rank and device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: Any = "cpu"
    """A ``torch.device`` (:func:`setup_dist`); ``"cpu"`` in a process that set none up (torch takes either)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch

            torch.distributed.barrier()


def setup_dist(parallel: str) -> DistEnv:
    """Initialise torch.distributed when launched by torchrun / accelerate (WORLD_SIZE > 1)."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if world > 1:
        if parallel == "split":
            raise TrainingError("train.parallel=split spreads one model over the GPUs of one process; "
                                "launch it with plain `python -m train`, not torchrun")
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        return DistEnv(torch.distributed.get_rank(), world, local_rank, device)
    return DistEnv(device=torch.device("cuda", 0) if cuda else torch.device("cpu"))


def device_map_for(cfg: RunConfig, env: DistEnv) -> tuple:
    """(device_map, max_memory): one full copy per rank (DDP / single), or the layers split over all visible GPUs
    (model parallel) with ``train.split_gpu_memory_gib`` of each for weights."""
    import torch

    from core.model import split_max_memory

    n_gpus = torch.cuda.device_count()
    if cfg.train.parallel == "split" and n_gpus > 1:
        return "auto", split_max_memory(cfg.train.split_gpu_memory_gib, n_gpus)
    return {"": torch.device(env.device)}, None


def allreduce_grads(params: list, world_size: int) -> None:
    """Average gradients across ranks in one flat buffer (LoRA + head: a few MB)."""
    import torch

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world_size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(p.dtype)
        offset += n


def broadcast_trainable(params: list, world_size: int) -> None:
    """Every rank starts from rank 0's trainable weights (LoRA init, score head), not from equal seeds."""
    if world_size < 2:
        return
    import torch

    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        torch.distributed.broadcast(flat, src=0)
        offset = 0
        for p in params:
            p.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


def check_finite(loss: float, step: int, guard_steps: int, dtype, what: str, world_size: int = 1) -> None:
    """The NaN/inf guard of the first ``guard_steps`` optimizer steps, with what to change.

    Under torchrun every rank checks every rank's loss (one tiny all-reduce), so a non-finite loss on one rank
    stops all of them with the same message instead of leaving the others waiting in the next all-reduce.
    """
    if step > guard_steps:
        return
    import torch

    bad_ranks = [] if math.isfinite(loss) else [0]
    if world_size > 1:
        flags = torch.zeros(world_size, dtype=torch.float64)
        flags[torch.distributed.get_rank()] = 0.0 if math.isfinite(loss) else 1.0
        torch.distributed.all_reduce(flags)
        bad_ranks = [r for r in range(world_size) if flags[r] > 0]
    if bad_ranks:
        hint = (" fp16 overflows easily with Gemma: use a bf16 GPU, model.dtype=float32, or a lower train.lr"
                if dtype == torch.float16 else " lower train.lr or check the data")
        # One process: the value (nan / inf); several: every rank says the same (it knows which ranks, not values).
        value = f"not finite on rank(s) {bad_ranks}" if world_size > 1 else str(loss)
        raise TrainingError(f"{what}: loss is {value} at optimizer step {step} "
                            f"(dtype {str(dtype).removeprefix('torch.')}).{hint}")
