"""Inversion metrics with the paper's definitions (Morris et al. 2023), plus bootstrap CIs.

- BLEU: sacrebleu sentence BLEU per pair, averaged (the paper's number); corpus BLEU beside it.
- Token F1: precision/recall over the *sets* of word tokens of prediction and reference.
- Exact match: equality after whitespace normalisation.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

from ..data.corpus import normalise
from ..errors import Logit2PromptError

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


# How each per-example metric is shown: fractions become percentages.
DISPLAY_SCALE = {
    "bleu": 1.0,
    "token_f1": 100.0,
    "exact": 100.0,
    "top1": 100.0,
    "cosine": 1.0,
    "kl": 1.0,
}


def summarize(per_example: dict[str, Sequence[float]], *, ci: bool = True) -> dict[str, dict]:
    """Mean of each per-example metric, in display units, with a 95% bootstrap CI."""
    out: dict[str, dict] = {}
    for name, values in per_example.items():
        if len(values) == 0:
            raise Logit2PromptError(f"no values for metric {name!r}: the set is empty")
        scale = DISPLAY_SCALE.get(name, 1.0)
        entry = {"mean": float(np.mean(values)) * scale}
        if ci:
            lo, hi = bootstrap_ci(values)
            entry["ci95"] = [lo * scale, hi * scale]
        out[name] = entry
    return out


def paired_gain(
    predictions: Sequence[str], baseline: Sequence[str], references: Sequence[str]
) -> dict[str, dict]:
    """Per-prompt BLEU / token F1 / exact of `predictions` minus `baseline` on the same
    references, with 95% bootstrap CIs (tighter than comparing two unpaired intervals)."""
    ours = per_example_scores(predictions, references)
    base = per_example_scores(baseline, references)
    gains = {k: list(np.subtract(ours[k], base[k])) for k in ("bleu", "token_f1", "exact")}
    return summarize(gains)


def score(
    predictions: Sequence[str], references: Sequence[str], *, ci: bool = True
) -> dict[str, dict]:
    """Mean of each metric (with a 95% bootstrap CI), plus corpus BLEU; F1/exact in percent."""
    out = summarize(per_example_scores(predictions, references), ci=ci)
    out["corpus_bleu"] = {"mean": corpus_bleu(predictions, references)}
    out["n"] = {"mean": len(references)}
    return out


COLUMNS = {  # key -> (header, number format)
    "bleu": ("BLEU", ".1f"),
    "token_f1": ("token F1", ".1f"),
    "exact": ("exact %", ".1f"),
    "cosine": ("cosine", ".3f"),
    "kl": ("KL nats", ".2f"),
    "top1": ("top-1 %", ".1f"),
}


def format_cell(entry: dict, fmt: str) -> str:
    ci = entry.get("ci95")
    mean = format(entry["mean"], fmt)
    return f"{mean} [{format(ci[0], fmt)},{format(ci[1], fmt)}]" if ci else mean


def format_ci(entry: dict, fmt: str = "+.2f") -> str:
    """A mean and its 95% CI, e.g. `+1.0 [-0.7, +2.9]` (a paired gain's sign shown)."""
    lo, hi = entry["ci95"]
    return f"{format(entry['mean'], fmt)} [{format(lo, fmt)}, {format(hi, fmt)}]"


def format_gain(gain: dict[str, dict]) -> str:
    """`paired_gain`'s result on one line: each metric's mean difference and its 95% CI."""
    return ", ".join(f"{k} {format_ci(v)}" for k, v in gain.items())


def format_table(rows: dict[str, dict[str, dict]]) -> str:
    """A plain-text table: one row per method; BLEU / token F1 / exact (and cosine, KL, top-1
    when present), each with its 95% CI."""
    keys = [k for k in COLUMNS if all(k in m for m in rows.values())]
    cells = {m: [format_cell(v[k], COLUMNS[k][1]) for k in keys] for m, v in rows.items()}
    widths = [
        max(len(COLUMNS[k][0]), *(len(c[i]) for c in cells.values())) for i, k in enumerate(keys)
    ]
    name_w = max(28, *(len(m) for m in rows))
    header = (
        f"{'method':{name_w}} "
        + " ".join(f"{COLUMNS[k][0]:>{w}}" for k, w in zip(keys, widths, strict=True))
        + f" {'n':>6}"
    )
    lines = [header, "-" * len(header)]
    for method, m in rows.items():
        row = " ".join(f"{c:>{w}}" for c, w in zip(cells[method], widths, strict=True))
        lines.append(f"{method:{name_w}} {row} {int(m['n']['mean']):6d}")
    return "\n".join(lines)
