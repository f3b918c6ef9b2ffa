"""Baselines that need no trained inverter: nearest neighbour and a constant guess."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from ..data.store import DistributionStore
from ..evaluation.metrics import token_f1

NN_CHUNK = 1024  # training vectors compared per block, bounds memory
MEDOID_SAMPLE = 500


def nearest_neighbours(
    train: DistributionStore | MemoryNeighbours,
    queries: np.ndarray,
    k: int = 1,
    indices: list[int] | None = None,
) -> list[list[int]]:
    """For each query `[steps, vocab]` (or `[vocab]`), the store indices of the k closest
    training vectors (L2 over the steps both have), closest first."""
    if isinstance(train, MemoryNeighbours):
        if indices is not None:
            raise ValueError("a neighbour memory is searched whole")
        return train.search(queries, k)
    pool = indices if indices is not None else list(range(len(train)))
    if not pool:
        raise ValueError("no training vectors to search")
    k = min(k, len(pool))  # else the placeholder index 0 would pass for a neighbour
    queries = np.asarray(queries, dtype=np.float32)
    if queries.ndim == 2:
        queries = queries[:, None]
    steps = min(queries.shape[1], train.steps)
    q = torch.from_numpy(np.ascontiguousarray(queries[:, :steps]).reshape(len(queries), -1))
    q_sq = (q * q).sum(1, keepdim=True)
    best = torch.full((len(q), k), float("inf"))
    best_idx = torch.zeros((len(q), k), dtype=torch.long)
    chunk = max(NN_CHUNK // steps, 1)  # training vectors in memory at once: ~NN_CHUNK steps
    for start in range(0, len(pool), chunk):
        block_idx = torch.tensor(pool[start : start + chunk])
        t = torch.from_numpy(train.vectors(block_idx.tolist(), steps).reshape(len(block_idx), -1))
        dist = q_sq - 2 * q @ t.T + (t * t).sum(1)[None]
        merged = torch.cat([best, dist], dim=1)
        merged_idx = torch.cat([best_idx, block_idx[None].expand(len(q), -1)], dim=1)
        best, order = merged.topk(min(k, merged.shape[1]), dim=1, largest=False)
        best_idx = merged_idx.gather(1, order)
    return best_idx.tolist()


class MemoryNeighbours:
    """A retrieval-augmented inverter's neighbour memory standing in for its training store:
    the same training prompts, searched by the memory's sketch of the first steps (it holds no
    vectors, so a re-ranker asks the target for theirs). Lets the nearest-neighbour baseline,
    the fallback and the re-ranker run where no store exists, e.g. with a shipped inverter."""

    steps = 0  # no stored vectors (see `stored_vectors`)

    def __init__(self, inverter):
        if inverter.memory is None:
            raise ValueError("this inverter carries no neighbour memory")
        self.inverter, self.memory, self.dim = inverter, inverter.memory, inverter.config.dim
        self.prompts = self.memory.prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def search(self, queries: np.ndarray, k: int) -> list[list[int]]:
        """Memory indices of the k nearest prompts of each query `[steps, vocab]`, keyed as
        the inverter reads them (a token-subset inverter: the centred subset observation)."""
        flat = self.inverter.as_batch(np.asarray(queries, np.float32))
        return self.memory.search(flat[:, : self.dim].cpu(), k)


def observed_steps(observed: np.ndarray) -> int:
    """Steps in an observation `[n, steps, vocab]` (1 for `[n, vocab]`)."""
    return observed.shape[1] if np.ndim(observed) == 3 else 1


def stored_vectors(train: DistributionStore, indices: list[int], steps: int) -> np.ndarray | None:
    """The training vectors at `steps` steps, or None when the store holds fewer (the caller
    then asks the target)."""
    return train.vectors(indices, steps) if train.steps >= steps else None


def sq_distances(observed: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Squared L2 distance (float32) of each row of `vectors` to `observed`: one vector for
    all rows, or one per row."""
    rows = np.asarray(vectors, np.float32).reshape(len(vectors), -1)
    diff = rows - np.asarray(observed, np.float32).reshape(-1, rows.shape[1])
    return np.einsum("ij,ij->i", diff, diff)


def nearest_neighbour(
    train: DistributionStore, queries: np.ndarray, indices: list[int] | None = None
) -> list[str]:
    """For each query vector, the training prompt whose log-prob vector is closest (L2)."""
    return [train.prompts[row[0]] for row in nearest_neighbours(train, queries, 1, indices)]


def constant_guess(prompts: list[str], seed: int = 0) -> str:
    """The most frequent training prompt; if all are unique, the medoid under token F1
    (the single guess that scores best against a sample of the training prompts)."""
    if not prompts:
        raise ValueError("no training prompts to guess from")
    counts = Counter(prompts)
    top, n = counts.most_common(1)[0]
    if n > 1:
        return top
    rng = np.random.default_rng(seed)
    sample = [
        prompts[i]
        for i in rng.choice(len(prompts), min(MEDOID_SAMPLE, len(prompts)), replace=False)
    ]
    return max(sample, key=lambda c: sum(token_f1(c, other) for other in sample))
