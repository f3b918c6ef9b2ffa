"""Inversion metrics with the paper's definitions (Morris et al. 2023), plus bootstrap CIs.

- BLEU: sacrebleu sentence BLEU per pair, averaged (the paper's number); corpus BLEU beside it.
- Token F1: precision/recall over the *sets* of word tokens of prediction and reference.
- Exact match: equality after whitespace normalisation.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

from .errors import Logit2PromptError
from .prompts import normalise

_WORD_RE = re.compile(r"\w+|[^\w\s]")
BOOTSTRAP_SAMPLES = 1000
CI_LEVEL = 0.95


def word_tokens(text: str) -> list[str]:
    """Word and punctuation tokens, close to NLTK's word_tokenize for English prompts."""
    return _WORD_RE.findall(text)


def token_f1(prediction: str, reference: str) -> float:
    """Set-based token F1 as in the paper's code (vec2text `_count_overlapping_ngrams`, n=1)."""
    pred, ref = set(word_tokens(prediction)), set(word_tokens(reference))
    if not pred and not ref:
        return 1.0
    overlap = len(pred & ref)
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    return float(normalise(prediction) == normalise(reference))


def sentence_bleu(prediction: str, reference: str) -> float:
    """sacrebleu sentence BLEU (exp smoothing, sacrebleu's default for sentence_bleu)."""
    import sacrebleu

    return sacrebleu.sentence_bleu(prediction, [reference]).score


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    import sacrebleu

    return sacrebleu.corpus_bleu(list(predictions), [list(references)]).score


PER_EXAMPLE: dict[str, Callable[[str, str], float]] = {
    "bleu": sentence_bleu,
    "token_f1": token_f1,
    "exact": exact_match,
}


def check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise Logit2PromptError(
            f"{len(predictions)} predictions but {len(references)} references; they must pair up"
        )
    if not references:
        raise Logit2PromptError("no predictions to score: the set is empty")


def per_example_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, list]:
    """Each metric for each pair; BLEU in 0..100, F1 and exact in 0..1."""
    check_pairs(predictions, references)
    return {
        name: [fn(p, r) for p, r in zip(predictions, references, strict=True)]
        for name, fn in PER_EXAMPLE.items()
    }


def bootstrap_ci(
    values: Sequence[float],
    samples: int = BOOTSTRAP_SAMPLES,
    level: float = CI_LEVEL,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean."""
    arr = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = arr[rng.integers(0, len(arr), size=(samples, len(arr)))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def score(
    predictions: Sequence[str], references: Sequence[str], *, ci: bool = True
) -> dict[str, dict]:
    """Mean of each metric (with a 95% bootstrap CI), plus corpus BLEU; F1/exact in percent."""
    per = per_example_scores(predictions, references)
    out: dict[str, dict] = {}
    for name, values in per.items():
        scale = 1.0 if name == "bleu" else 100.0
        entry = {"mean": float(np.mean(values)) * scale}
        if ci:
            lo, hi = bootstrap_ci(values)
            entry["ci95"] = [lo * scale, hi * scale]
        out[name] = entry
    out["corpus_bleu"] = {"mean": corpus_bleu(predictions, references)}
    out["n"] = {"mean": len(references)}
    return out


def format_table(rows: dict[str, dict[str, dict]]) -> str:
    """A plain-text table: one row per method, columns BLEU / token F1 / exact (with CIs)."""
    header = f"{'method':28} {'BLEU':>16} {'token F1':>16} {'exact %':>16} {'n':>6}"
    lines = [header, "-" * len(header)]
    for method, m in rows.items():
        cells = []
        for key in ("bleu", "token_f1", "exact"):
            entry = m[key]
            ci = entry.get("ci95")
            cells.append(
                f"{entry['mean']:5.1f} [{ci[0]:4.1f},{ci[1]:5.1f}]"
                if ci
                else f"{entry['mean']:16.1f}"
            )
        lines.append(
            f"{method:28} {cells[0]:>16} {cells[1]:>16} {cells[2]:>16} {int(m['n']['mean']):6d}"
        )
    return "\n".join(lines)
