"""Verification by the target: pick, among candidate prompts, the one whose own next-token
distribution is closest to the observed one.

An attacker who sees log-probs can also query the target with prompts of its own. Candidates
come from the inverter (beam search) and from the nearest training prompts; each inverter
candidate is run through the target once, and the candidate nearest to the observed vector
(L2 over log-probs, the nearest-neighbour baseline's distance) wins. The neighbours' vectors are
already in the training store, so only the inverter's candidates cost target queries.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .baselines import nearest_neighbours
from .collect import collect_vectors
from .store import DistributionStore

DEFAULT_BEAMS = 4
DEFAULT_NEIGHBOURS = 3


def rerank(
    target,
    observed: np.ndarray,
    candidates: Sequence[Sequence[str]],
    known: dict[str, np.ndarray] | None = None,
    batch_size: int = 32,
) -> list[str]:
    """Per row of `observed` `[n, steps, vocab]`, the candidate whose target vector is nearest."""
    known = dict(known or {})
    steps = observed.shape[1]
    fresh = sorted({c for row in candidates for c in row if c.strip() and c not in known})
    if fresh:
        for text, vec in zip(fresh, collect_vectors(target, fresh, steps, batch_size), strict=True):
            known[text] = vec
    out = []
    for obs, row in zip(observed, candidates, strict=True):
        pool = [c for c in row if c in known]
        if not pool:
            out.append(row[0] if row else "")
            continue
        stacked = torch.from_numpy(np.stack([known[c] for c in pool]).astype(np.float32))
        dist = ((stacked - torch.from_numpy(obs.astype(np.float32))) ** 2).flatten(1).sum(1)
        out.append(pool[int(dist.argmin())])
    return out


def inverter_with_neighbours(
    inverter,
    target,
    train: DistributionStore,
    observed: np.ndarray,
    *,
    beams: int = DEFAULT_BEAMS,
    neighbours: int = DEFAULT_NEIGHBOURS,
    no_repeat_ngram_size: int = 0,
    batch_size: int = 32,
) -> list[str]:
    """The inverter's beams plus the nearest training prompts, re-ranked by the target."""
    beams_out = inverter.invert(
        torch.from_numpy(observed),
        num_beams=beams,
        num_return_sequences=beams,
        no_repeat_ngram_size=no_repeat_ngram_size,
        batch_size=batch_size,
    )
    near = nearest_neighbours(train, observed, neighbours)
    known = {train.prompts[i]: train.vector(i) for row in near for i in row}
    candidates = [
        [*b, *(train.prompts[i] for i in row)] for b, row in zip(beams_out, near, strict=True)
    ]
    return rerank(target, observed, candidates, known, batch_size)
