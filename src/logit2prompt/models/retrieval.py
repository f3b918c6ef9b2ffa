"""Neighbour memory: the training prompts, searchable by how close their log-prob vectors are.

A retrieval-augmented inverter (`InverterConfig.neighbours > 0`) reads, beside the vector, the
token ids of the training prompts whose vectors are nearest, so it can copy their template and
fix the details the vector gives away. The memory travels inside the checkpoint, so it must be
small: each vector is compressed by a count sketch (every vocabulary entry is added, with a
random sign, into one of `dims` buckets), which preserves L2 distances in expectation -- the
distance the nearest-neighbour baseline uses on full vectors. The bucket and sign of every entry
are stored beside the keys, so the sketch needs no random generator to be reproduced.

File: `neighbours.safetensors` in the checkpoint directory (keys, center, buckets, signs) and
`neighbours.json` (the prompts).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError, VectorError

MEMORY_WEIGHTS = "neighbours.safetensors"
MEMORY_PROMPTS = "neighbours.json"
SEARCH_BLOCK = 4096  # rows per block of queries and of memory, bounds memory on big stores
CANDIDATE_SLACK = 8  # extra neighbours fetched so excluded ones (self, same text) can be dropped


class NeighbourMemory:
    """Sketched log-prob vectors of a training store, with their prompts."""

    def __init__(
        self,
        prompts: list[str],
        keys: torch.Tensor,
        center: torch.Tensor,
        buckets: torch.Tensor,
        signs: torch.Tensor,
    ):
        """`keys`: sketches minus `center`, one row per prompt (see `build`)."""
        if len(prompts) != len(keys):
            raise CheckpointError(f"neighbour memory: {len(prompts)} prompts but {len(keys)} keys")
        self.prompts = prompts
        self.keys = keys.float()
        self.center = center.float()
        self.buckets = buckets.long()
        self.signs = signs.float()
        self.dims = int(keys.shape[1])
        self._key_sq = (self.keys * self.keys).sum(1)

    # ------------------------------------------------------------------ building
    @staticmethod
    def sketch_params(dim: int, dims: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bucket and sign of each of `dim` entries (numpy's PCG64: stable across versions)."""
        rng = np.random.default_rng(seed)
        buckets = torch.from_numpy(rng.integers(0, dims, dim).astype(np.int64))
        signs = torch.from_numpy(rng.choice(np.array([-1.0, 1.0], dtype=np.float32), dim))
        return buckets, signs

    @classmethod
    def build(
        cls,
        prompts: list[str],
        batches: Iterable[np.ndarray],
        dim: int,
        dims: int = 1024,
        seed: int = 0,
    ) -> NeighbourMemory:
        """Sketch every vector of `batches` (`[n, ...]` arrays, in `prompts` order)."""
        buckets, signs = cls.sketch_params(dim, dims, seed)
        zero = torch.zeros(dims)
        raw = cls([], torch.zeros((0, dims)), zero, buckets, signs)
        keys = [raw.sketch(torch.from_numpy(np.asarray(b)).reshape(len(b), -1)) for b in batches]
        if not keys:
            raise CheckpointError("cannot build a neighbour memory from an empty store")
        stacked = torch.cat(keys)
        # Stored centred (and in fp16): log-probs add up to large sketch values whose common
        # part carries no distance information but would eat fp16 precision.
        center = stacked.mean(0)
        return cls(list(prompts), stacked - center, center, buckets, signs)

    @classmethod
    def from_store(
        cls,
        store,
        dim: int,
        *,
        steps: int,
        dims: int = 1024,
        seed: int = 0,
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
        subset=None,
        progress: bool = False,
    ) -> NeighbourMemory:
        """The memory of a `DistributionStore`'s prompts and first `steps` steps, read
        READ_BATCH rows at a time (`transform`: e.g. the training defense, applied per batch;
        `subset`: observations through a token subset, as the store's `batches` reads them)."""
        from tqdm.auto import tqdm

        from ..data.store import READ_BATCH

        batches = (
            vectors if transform is None else transform(vectors)
            for _, _, vectors in store.batches(READ_BATCH, steps=steps, subset=subset)
        )
        total = -(-len(store) // READ_BATCH)
        bar = tqdm(batches, total=total, desc="neighbour memory", disable=not progress)
        return cls.build(store.prompts, bar, dim, dims=dims, seed=seed)

    def sketch(self, vectors: torch.Tensor) -> torch.Tensor:
        """Flat `[B, dim]` vectors -> `[B, dims]` sketches."""
        x = vectors.float().reshape(len(vectors), -1)
        if x.shape[1] != len(self.buckets):
            raise VectorError(
                f"neighbour memory sketches vectors of {len(self.buckets)} entries, "
                f"got {x.shape[1]}"
            )
        out = torch.zeros((len(x), self.dims), dtype=torch.float32)
        return out.index_add_(1, self.buckets, x * self.signs) - self.center

    # ------------------------------------------------------------------ search
    def search(
        self,
        vectors: torch.Tensor,
        k: int,
        exclude: list[int] | None = None,
    ) -> list[list[int]]:
        """Memory indices of the k nearest entries per vector, closest first.

        `exclude[b]` (a memory index, or -1) drops that entry and every entry with the same
        prompt text: a training example must not see itself, or it learns to copy instead of
        to read the vector (test prompts never appear in training).
        """
        return self.search_sketches(self.sketch(vectors), k, exclude)

    def search_sketches(
        self, q: torch.Tensor, k: int, exclude: list[int] | None = None
    ) -> list[list[int]]:
        """`search` for queries already sketched (rows of `keys` included)."""
        fetch = min(k + (CANDIDATE_SLACK if exclude is not None else 0), len(self.prompts))
        out: list[list[int]] = []
        for q_start in range(0, len(q), SEARCH_BLOCK):
            block_q = q[q_start : q_start + SEARCH_BLOCK]
            for b, row in enumerate(self._nearest(block_q, fetch), start=q_start):
                if exclude is not None and exclude[b] >= 0:
                    own = self.prompts[exclude[b]]
                    row = [i for i in row if self.prompts[i] != own]
                out.append(row[:k])
        return out

    def _nearest(self, q: torch.Tensor, fetch: int) -> list[list[int]]:
        best = torch.full((len(q), fetch), float("inf"))
        best_idx = torch.zeros((len(q), fetch), dtype=torch.long)
        q_sq = (q * q).sum(1, keepdim=True)
        for start in range(0, len(self.keys), SEARCH_BLOCK):
            block = self.keys[start : start + SEARCH_BLOCK]
            dist = q_sq - 2 * q @ block.T + self._key_sq[start : start + SEARCH_BLOCK][None]
            idx = torch.arange(start, start + len(block)).expand(len(q), -1)
            best, order = torch.cat([best, dist], 1).topk(fetch, dim=1, largest=False)
            best_idx = torch.cat([best_idx, idx], 1).gather(1, order)
        return best_idx.tolist()

    # ------------------------------------------------------------------ files
    def save(self, directory: str | Path) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        save_file(
            {
                "keys": self.keys.half().contiguous(),
                "buckets": self.buckets.int().contiguous(),
                "signs": self.signs.to(torch.int8).contiguous(),
                "center": self.center.contiguous(),
            },
            str(directory / MEMORY_WEIGHTS),
        )
        (directory / MEMORY_PROMPTS).write_text(json.dumps(self.prompts, ensure_ascii=False))

    @classmethod
    def load(cls, directory: str | Path) -> NeighbourMemory:
        """Read a memory written by `save`; CheckpointError when missing or corrupted."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        try:
            tensors = load_file(str(directory / MEMORY_WEIGHTS))
            prompts = json.loads((directory / MEMORY_PROMPTS).read_text(encoding="utf-8"))
            return cls(
                prompts, tensors["keys"], tensors["center"], tensors["buckets"], tensors["signs"]
            )
        except (SafetensorError, OSError, ValueError, KeyError) as exc:
            raise CheckpointError(
                f"{directory}: the neighbour memory of this retrieval-augmented inverter is "
                f"missing or corrupted ({exc})"
            ) from exc
