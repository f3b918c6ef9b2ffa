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
from tqdm.auto import tqdm

from ..data.collect import collect_vectors
from ..data.store import DistributionStore
from ..models.inverter import encode_labels, pad_labels
from .nearest import nearest_neighbours, observed_steps, sq_distances, stored_vectors

DEFAULT_BEAMS = 4
DEFAULT_NEIGHBOURS = 3
LIKELIHOOD_CANDIDATES = 10
SELF_RERANK_RULES = ("summed", "per-token")


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
        dist = sq_distances(obs, np.stack([known[c] for c in pool]))
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
    near: list[list[int]] | None = None,
    bf16: bool = False,
) -> list[str]:
    """The inverter's beams plus the nearest training prompts, re-ranked by the target
    (`near`: the nearest training indices per row, if the caller searched already; `bf16`:
    decode the beams under bf16 autocast)."""
    beams_out = inverter.invert(
        torch.from_numpy(observed),
        steps=observed_steps(observed),
        num_beams=beams,
        num_return_sequences=beams,
        no_repeat_ngram_size=no_repeat_ngram_size,
        batch_size=batch_size,
        bf16=bf16,
        grouped=True,
    )
    return proposals_with_neighbours(
        target, train, observed, beams_out, neighbours, batch_size, near=near
    )


def proposals_with_neighbours(
    target,
    train: DistributionStore,
    observed: np.ndarray,
    proposals: Sequence[Sequence[str]],
    neighbours: int = DEFAULT_NEIGHBOURS,
    batch_size: int = 32,
    near: list[list[int]] | None = None,
) -> list[str]:
    """Per row, already decoded `proposals` plus the nearest training prompts, re-ranked by the
    target (for callers that decoded beams once and keep them as their own output too).

    `near` (nearest training indices per row, closest first, at least `neighbours` each) spares
    a second pass over the training store when the caller searched already.
    """
    if near is None:
        near = nearest_neighbours(train, observed, neighbours)
    elif len(near) != len(observed) or any(len(row) < neighbours for row in near):
        raise ValueError(
            f"near needs {neighbours} indices for each of {len(observed)} rows; "
            f"got {len(near)} rows, the shortest with {min(map(len, near), default=0)}"
        )
    near = [row[:neighbours] for row in near]
    rows = [i for row in near for i in row]
    stored = stored_vectors(train, rows, observed_steps(observed))
    # Without them (the store holds fewer steps than observed) the target scores them too.
    known = (
        {} if stored is None else {train.prompts[i]: v for i, v in zip(rows, stored, strict=True)}
    )
    candidates = [
        [*p, *(train.prompts[i] for i in row)] for p, row in zip(proposals, near, strict=True)
    ]
    return rerank(target, observed, candidates, known, batch_size)


@torch.no_grad()
def candidate_likelihoods(
    inverter,
    observed: np.ndarray,
    candidates: Sequence[Sequence[str]],
    batch_size: int = 32,
    progress: bool = True,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """How well the inverter says each candidate prompt explains its row of `observed`: per row,
    (summed NLL, token count) arrays aligned with that row's candidates.

    No target queries: teacher forcing through the inverter alone. A retrieval-augmented
    inverter reads the same memory neighbours as when it decodes, looked up once per row.
    """
    if len(candidates) != len(observed):
        raise ValueError(f"{len(candidates)} candidate rows for {len(observed)} vectors")
    flat = torch.from_numpy(np.asarray(observed, dtype=np.float32)).flatten(1)
    neighbour_ids = inverter.find_neighbours(flat) if inverter.config.neighbours else None
    texts = sorted({c for row in candidates for c in row})
    encoded = encode_labels(inverter.tokenizer, texts, inverter.config.max_length)
    labels = dict(zip(texts, encoded, strict=True))
    pairs = [(i, c) for i, row in enumerate(candidates) for c in row]
    # Similar lengths share a batch: less padding through the decoder.
    order = sorted(range(len(pairs)), key=lambda p: len(labels[pairs[p][1]]))
    nll = np.zeros(len(pairs))
    device = inverter.feature_mean.device
    was_training = inverter.training
    inverter.eval()
    # Thousands of candidates take tens of minutes on a CPU.
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="score candidates", unit="batch", disable=not progress):
        chunk = order[start : start + batch_size]
        rows = [pairs[p][0] for p in chunk]
        padded = pad_labels([labels[pairs[p][1]] for p in chunk])
        near = neighbour_ids[rows].to(device) if neighbour_ids is not None else None
        out = inverter(flat[rows].to(device), padded.to(device), near, per_example=True)
        nll[chunk] = out.float().cpu().numpy()
    inverter.train(was_training)
    counts = np.array([len(labels[c]) for _, c in pairs], dtype=np.float64)
    bounds = np.cumsum([0, *map(len, candidates)])
    return (
        [nll[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)],
        [counts[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)],
    )


def neighbour_likelihoods(
    inverter,
    train: DistributionStore,
    observed: np.ndarray,
    k: int = LIKELIHOOD_CANDIDATES,
    batch_size: int = 40,
    near: list[list[int]] | None = None,
) -> tuple[list[list[int]], np.ndarray, np.ndarray]:
    """The k nearest training prompts (L2) of each observed vector (or the given `near`
    rows), and how well the inverter says each explains it: (indices `[n][k]`, summed NLL
    `[n, k]`, token counts `[n, k]`).

    No target queries: the inverter scores candidates by teacher forcing.
    """
    if near is None:
        near = nearest_neighbours(train, observed, k)
    candidates = [[train.prompts[j] for j in row] for row in near]
    nll, counts = candidate_likelihoods(inverter, observed, candidates, batch_size)
    return near, np.stack(nll), np.stack(counts)


def pick_by_likelihood(
    train: DistributionStore, near: list[list[int]], nll: np.ndarray, counts: np.ndarray, mean: bool
) -> list[str]:
    """Per row, the candidate with the lowest NLL (summed, or per token with `mean`)."""
    score = nll / counts if mean else nll
    return [train.prompts[row[int(np.argmin(s))]] for row, s in zip(near, score, strict=True)]


def pick_by_inverter(
    nll: np.ndarray, tokens: np.ndarray, neighbour: np.ndarray, rule: str, bonus: float = 0.0
) -> int:
    """Index of the candidate the inverter prefers: lowest NLL, summed or per token (`rule`),
    after lowering each training neighbour's (`neighbour` mask) by `bonus`. The bonus offsets
    beam search's head start: the beams were chosen to maximise this very likelihood."""
    if rule not in SELF_RERANK_RULES:
        raise ValueError(f"rule must be one of {SELF_RERANK_RULES}, not {rule!r}")
    score = nll / np.maximum(tokens, 1) if rule == "per-token" else np.asarray(nll, dtype=float)
    return int(np.argmin(score - bonus * np.asarray(neighbour, dtype=float)))


# The top beam's summed NLL (nats) below which the inverter's own answer is trusted over the
# nearest training prompt: chosen on the 48k quality run's validation split
# (benchmarks/self_rerank.py; benchmarks/results/self_rerank-48k-nn2.json).
DEFAULT_CONFIDENCE_NATS = 2.0


def confident_or_nearest(
    inverter,
    train: DistributionStore,
    observed: np.ndarray,
    proposals: Sequence[str],
    nats: float = DEFAULT_CONFIDENCE_NATS,
    near: list[list[int]] | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> tuple[list[str], np.ndarray]:
    """Per row, the inverter's `proposals` entry where the inverter is confident of it (summed
    NLL below `nats`), else the nearest training prompt; and the boolean mask of rows that kept
    the inverter's own. No target queries: one teacher-forced pass per row. `near` spares a
    second pass over the training store."""
    if near is None:
        near = nearest_neighbours(train, observed, 1)
    candidates = [[p] for p in proposals]
    nll, _ = candidate_likelihoods(inverter, observed, candidates, batch_size, progress)
    # A blank output (EOS first) is cheap in NLL but never a prompt: the neighbour answers.
    kept = np.array(
        [float(n[0]) < nats and bool(p.strip()) for n, p in zip(nll, proposals, strict=True)],
        dtype=bool,
    )
    answers = [
        p if keep else train.prompts[row[0]]
        for p, keep, row in zip(proposals, kept, near, strict=True)
    ]
    return answers, kept
