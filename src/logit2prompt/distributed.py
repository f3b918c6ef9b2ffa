"""Process-group set-up shared by collection and training."""

from __future__ import annotations

import os

import torch


def accelerate_cpu() -> bool:
    """Whether Accelerate should treat this run as CPU-only.

    Accelerate forms a multi-process CPU group (gloo) only when told it runs on CPU, and its
    `--cpu` launcher starts a single process; so on a machine without CUDA we say so ourselves,
    and `accelerate launch --multi_gpu --num_processes N` then gives N CPU processes.
    """
    return (
        os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        or not torch.cuda.is_available()
    )


def partial_state():
    """The Accelerate process state (rank, world size, device) for this run."""
    from accelerate import PartialState

    return PartialState(cpu=accelerate_cpu())
