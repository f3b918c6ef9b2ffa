"""Features: normalise a log-prob vector and unroll it into a sequence of chunks.

The paper (Morris et al. 2023) unrolls a vector of size V into ceil(V / d) chunks of width d,
zero padded; each chunk becomes one encoder position. Its code subtracts a running mean of the
training vectors first; `standardize` also divides by the per-entry standard deviation.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import VectorError

NORMALIZATIONS = ("mean", "standardize", "none")
STD_FLOOR = 1e-3  # entries that never move in training must not blow up when standardised


def num_chunks(dim: int, width: int) -> int:
    return math.ceil(dim / width)


def unroll(x: torch.Tensor, width: int) -> torch.Tensor:
    """`[batch, dim]` -> `[batch, ceil(dim / width), width]`, zero padded at the end."""
    pad = num_chunks(x.shape[-1], width) * width - x.shape[-1]
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(x.shape[0], -1, width)


def feature_stats(vectors_iter, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of flattened float32 vectors from an iterator of `[n, ...]` arrays."""
    total = np.zeros(dim, dtype=np.float64)
    total_sq = np.zeros(dim, dtype=np.float64)
    count = 0
    for arr in vectors_iter:
        flat = np.asarray(arr, dtype=np.float64).reshape(len(arr), dim)
        total += flat.sum(0)
        total_sq += (flat**2).sum(0)
        count += len(flat)
    if count == 0:
        raise VectorError("no training vectors to compute feature statistics from")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return mean.astype(np.float32), np.maximum(std, STD_FLOOR).astype(np.float32)


def check_vectors(x: torch.Tensor, shape: tuple[int, ...], described: str) -> torch.Tensor:
    """Validate a batch of log-prob vectors: trailing shape and finiteness; returns `[B, dim]`."""
    if tuple(x.shape[-len(shape) :]) != shape or x.dim() != len(shape) + 1:
        raise VectorError(
            f"log-prob vectors of shape {tuple(x.shape)} do not fit this inverter, which reads "
            f"[batch, {', '.join(map(str, shape))}] from {described}"
        )
    if not len(x):
        raise VectorError("no vectors to invert (an empty batch)")
    flat = x.reshape(len(x), -1).float()  # float64 beyond float32's range becomes inf: caught
    bad = ~torch.isfinite(flat).all(dim=1)
    if bad.any():
        raise VectorError(f"vector {int(bad.nonzero()[0])} contains NaN or inf; nothing inverted")
    return flat
