"""Training data for a corrector: an inverter that reads near misses of the prompt.

A search round (`attacks.search.conditioned_proposals`) hands a retrieval-augmented inverter
the candidates a judge found closest in place of its memory's nearest training prompts. An
inverter trained only on memory neighbours never saw such near misses. vec2text's corrector
recipe trains on the model's own hypotheses instead: decode every training prompt once (greedy,
a few samples, and the memory's nearest prompts, as the search proposes them), keep the `keep`
closest to the true prompt (closest first, as the judge orders them), and train with those as
the neighbours (`TrainConfig.neighbour_texts`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..data.corpus import normalise, whole_lines
from ..data.store import DistributionStore
from ..errors import StoreError
from ..evaluation.metrics import sentence_bleu, token_f1

logger = logging.getLogger(__name__)


def closest_first(candidates: list[str], reference: str, keep: int) -> list[str]:
    """The `keep` distinct non-blank candidates nearest `reference` by sentence BLEU plus token
    F1 (a stand-in for the judge's KL, which needs the target), nearest first; the reference
    itself is never kept (a corrector must not learn to copy the answer)."""
    ref = normalise(reference)
    texts = [t for t in dict.fromkeys(c.strip() for c in candidates) if t and normalise(t) != ref]
    score = {t: sentence_bleu(t, reference) / 100 + token_f1(t, reference) for t in texts}
    return sorted(texts, key=lambda t: -score[t])[:keep]


def write_hypotheses(
    inverter,
    store: DistributionStore | str | os.PathLike,
    out: str | os.PathLike,
    *,
    samples: int = 3,
    memory: int = 4,
    keep: int = 2,
    seed: int = 0,
    batch_size: int = 64,
    bf16: bool = False,
    progress: bool = True,
) -> Path:
    """JSONL `{"prompt", "neighbours"}` for every prompt of `store`: the `keep` closest of the
    inverter's greedy output, `samples` samples and its memory's `memory` nearest prompts.
    Written a batch at a time and resumed from what `out` already holds (a killed run loses
    one batch)."""
    from ..attacks.invert import ensure_same_target
    from ..attacks.search import proposals

    store = store if isinstance(store, DistributionStore) else DistributionStore(store)
    ensure_same_target(inverter, store)
    out = Path(out)
    done = [json.loads(line)["prompt"] for line in whole_lines(out)]
    if done != list(store.prompts[: len(done)]):
        raise StoreError(f"{out} holds hypotheses of other prompts than {store.path}")
    todo = list(range(len(done), len(store)))
    if not todo:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(store), initial=len(done), desc="hypotheses", disable=not progress)
    with open(out, "a", encoding="utf-8") as f:
        for idx, prompts, vectors in store.batches(
            batch_size, indices=todo, steps=inverter.config.steps
        ):
            rows, _ = proposals(
                inverter,
                np.asarray(vectors),
                memory,
                batch_size=batch_size,
                bf16=bf16,
                samples=samples,
                seed=seed + idx[0],
            )
            for prompt, row in zip(prompts, rows, strict=True):
                near = closest_first(row, prompt, keep)
                f.write(json.dumps({"prompt": prompt, "neighbours": near}) + "\n")
            f.flush()
            bar.update(len(idx))
    bar.close()
    return out


def read_neighbour_texts(path: str | os.PathLike, prompts: list[str]) -> list[list[str]]:
    """Per prompt (in `prompts` order), the neighbour texts `path` gives it; every prompt must
    have at least one non-blank neighbour."""
    given: dict[str, list[str]] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                row = json.loads(line)
                texts = [t for t in row["neighbours"] if isinstance(t, str) and t.strip()]
                given[normalise(str(row["prompt"]))] = texts
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StoreError(
            f"--neighbour-texts {path}: not a JSONL of prompt/neighbours: {exc}"
        ) from exc
    rows = [given.get(normalise(p)) for p in prompts]
    missing = [p for p, r in zip(prompts, rows, strict=True) if not r]
    if missing:
        raise StoreError(
            f"--neighbour-texts {path} gives no neighbours for {len(missing)} of {len(prompts)} "
            f"training prompts (first: {missing[0][:80]!r})"
        )
    return rows  # type: ignore[return-value]
