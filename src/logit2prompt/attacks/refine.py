"""Refinement by the target: edit a candidate prompt a token at a time, keeping an edit when the
target's next-token distribution for the edited prompt is closer to the observed one.

Retrieval finds the template (the nearest training prompt) but not the details that make the
hidden prompt unique; the inverter knows which tokens the vector favours but writes poor text
from scratch. Here the inverter proposes and the target decides. Teacher-forced on the current
candidate, the inverter's most likely tokens at each position give substitutions and insertions
(and a deletion where it prefers the next token), ranked by how much more likely it finds them
than the token that is there; the target runs the best `proposals` of them, and the nearest (L2
over log-probs, the distance of `rerank` and of the nearest-neighbour baseline) replaces the
candidate when it is closer. A round costs `proposals` target queries per prompt; a prompt whose
round changed nothing is done.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.collect import collect_vectors
from ..data.store import DistributionStore
from ..errors import VectorError
from ..models.inverter import encode_labels, pad_labels
from .nearest import nearest_neighbours, observed_steps, sq_distances, stored_vectors

# An inserted token's margin is measured against the token it pushes right, which stays, so it
# overstates the gain; this (in nats) ranks a substitution above an equally likely insertion.
INSERT_PENALTY = 0.5


@dataclass
class RefineConfig:
    """How hard to search: rounds, target queries per prompt and round, inverter candidates."""

    rounds: int = 3
    proposals: int = 12  # target queries per prompt and round
    alternatives: int = 6  # inverter tokens considered at each position
    inverter_batch: int = 16
    target_batch: int = 32


@dataclass
class Refined:
    """Final prompts, their squared L2 distances, and the prompts after each round."""

    prompts: list[str]
    distances: np.ndarray
    rounds: list[list[str]] = field(default_factory=list)
    queries: int = 0  # target queries spent


def _edits(
    ids: list[int], logprobs: torch.Tensor, eos: int, alternatives: int
) -> list[tuple[float, list[int]]]:
    """(margin, edited ids) for every single-token edit the inverter prefers at some position."""
    length = len(ids)
    here = [*ids, eos]  # position `length` predicts the end of the prompt
    current = logprobs[torch.arange(length + 1), torch.tensor(here)].tolist()
    top = logprobs[: length + 1].topk(alternatives, -1)
    out = []
    for t in range(length + 1):
        for token, lp in zip(top.indices[t].tolist(), top.values[t].tolist(), strict=True):
            margin = lp - current[t]
            if token == here[t]:
                continue
            if token == eos:
                out.append((margin, ids[:t]))  # end the prompt here
                continue
            if t < length:
                out.append((margin, [*ids[:t], token, *ids[t + 1 :]]))
            out.append((margin - INSERT_PENALTY, [*ids[:t], token, *ids[t:]]))
        if t < length:
            # Deleting token t: the inverter would rather see the one after it here.
            out.append((float(logprobs[t, here[t + 1]]) - current[t], [*ids[:t], *ids[t + 1 :]]))
    return out


def propose(
    inverter, vectors: torch.Tensor, prompts: Sequence[str], cfg: RefineConfig
) -> list[list[str]]:
    """Up to `cfg.proposals` single-token edits of each prompt, most preferred first."""
    tokenizer, eos = inverter.tokenizer, inverter.config.eos_token_id
    labels = encode_labels(tokenizer, prompts, inverter.config.max_length)
    logprobs = inverter.label_logprobs(vectors, pad_labels(labels))
    out = []
    for row, (prompt, ids) in enumerate(zip(prompts, labels, strict=True)):
        edits = _edits(ids[:-1], logprobs[row], eos, cfg.alternatives)  # labels end with EOS
        edits.sort(key=lambda e: -e[0])
        seen, texts = {prompt.strip()}, []
        for _, edited in edits:
            text = tokenizer.decode(edited, skip_special_tokens=True).strip()
            if text and text not in seen:
                seen.add(text)
                texts.append(text)
                if len(texts) == cfg.proposals:
                    break
        out.append(texts)
    return out


def refine(
    inverter,
    target,
    observed: np.ndarray,
    start: Sequence[str],
    start_distances: np.ndarray | None = None,
    cfg: RefineConfig | None = None,
    progress: bool = True,
    on_round: Callable[[int, Refined], None] | None = None,
) -> Refined:
    """Refine each `start` prompt towards its row of `observed` `[n, steps, vocab]` (or
    `[n, vocab]`); `start_distances` saves the target queries for the start prompts."""
    cfg = cfg or RefineConfig()
    given = np.asarray(observed)
    steps = observed_steps(given)  # every step observed is verified, not only trained ones
    flat = inverter.as_batch(given, steps)
    observed = flat.numpy()
    if len(start) != len(observed):
        raise VectorError(f"{len(start)} start prompts for {len(observed)} observed vectors")
    current = list(start)
    queries = 0
    if start_distances is None:
        vectors = collect_vectors(target, current, steps, cfg.target_batch)
        start_distances = sq_distances(observed, vectors)
        queries += len(current)
    result = Refined(current, np.asarray(start_distances, np.float64).copy(), [], queries)
    active = list(range(len(current)))
    was_training = inverter.training
    inverter.eval()
    try:
        for r in range(cfg.rounds):
            changed = []
            bar = tqdm(total=len(active), desc=f"refine round {r + 1}", disable=not progress)
            for s in range(0, len(active), cfg.inverter_batch):
                rows = active[s : s + cfg.inverter_batch]
                proposals = propose(inverter, flat[rows], [current[i] for i in rows], cfg)
                texts = [t for p in proposals for t in p]
                if texts:
                    vectors = collect_vectors(target, texts, steps, cfg.target_batch)
                    result.queries += len(texts)
                k = 0
                for i, p in zip(rows, proposals, strict=True):
                    if not p:
                        continue
                    d = sq_distances(observed[i], vectors[k : k + len(p)])
                    k += len(p)
                    best = int(d.argmin())
                    if d[best] < result.distances[i]:
                        current[i], result.distances[i] = p[best], float(d[best])
                        changed.append(i)
                bar.update(len(rows))
            bar.close()
            result.rounds.append(list(current))
            if on_round is not None:
                on_round(r, result)
            active = changed
            if not active:
                break
    finally:
        inverter.train(was_training)
    return result


def nearest_start(
    train: DistributionStore, observed: np.ndarray, near: list[int] | None = None
) -> tuple[list[str], np.ndarray | None]:
    """Each vector's nearest training prompt and its squared distance (from the store, so no
    target queries; None when the store holds fewer steps than observed); `near`: each
    vector's nearest training index, if searched already."""
    observed = np.asarray(observed, np.float32)
    if near is None:
        near = [row[0] for row in nearest_neighbours(train, observed, 1)]
    start = [train.prompts[j] for j in near]
    stored = stored_vectors(train, near, observed_steps(observed))
    return start, None if stored is None else sq_distances(observed, stored)


def refine_nearest(
    inverter,
    target,
    train: DistributionStore,
    observed: np.ndarray,
    cfg: RefineConfig | None = None,
    progress: bool = True,
    near: list[int] | None = None,
) -> tuple[list[str], Refined]:
    """Refine each vector's nearest training prompt: (the nearest prompts, the refinement);
    `near` as in `nearest_start`."""
    observed = np.asarray(observed, np.float32)
    k = observed_steps(observed)
    observed = inverter.as_batch(observed, k).numpy().reshape(len(observed), k, -1)
    start, dist = nearest_start(train, observed, near)
    return start, refine(inverter, target, observed, start, dist, cfg, progress)
