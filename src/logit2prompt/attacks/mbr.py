"""Minimum-Bayes-risk choice among an inverter's candidates (Kumar & Byrne 2004; Freitag
et al. 2022 for sampled pseudo-references).

Greedy decoding returns the inverter's most likely prompt; when the observation says little
(a guarded reply such as "The task is to provide a detailed answer"), that mode is one
specific, confidently wrong request. MBR instead returns the candidate that agrees most, by
the metric itself, with prompts sampled from the inverter: the decision that maximises the
expected score under the inverter's own belief. It sends no queries to the target.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..errors import Logit2PromptError
from ..evaluation.metrics import sentence_bleu, token_f1


def _bleu(hyp: str, ref: str) -> float:
    return sentence_bleu(hyp, ref) / 100.0


def _bleu_f1(hyp: str, ref: str) -> float:
    return 0.5 * (sentence_bleu(hyp, ref) / 100.0 + token_f1(hyp, ref))


UTILITIES: dict[str, Callable[[str, str], float]] = {
    "bleu": _bleu,
    "f1": token_f1,
    "bleu+f1": _bleu_f1,  # the two headline metrics, equally weighted
}
DEFAULT_UTILITY = "bleu+f1"


def mbr_choice(
    hypotheses: Sequence[str], references: Sequence[str], utility: str = DEFAULT_UTILITY
) -> str:
    """The hypothesis with the highest mean utility against the pseudo-references (samples;
    duplicates count as often as they were drawn). A hypothesis that was itself drawn is not
    scored against that one draw (every sample would otherwise get the same self-match bonus
    that a non-sampled hypothesis, such as the greedy output, lacks). Ties go to the earlier."""
    if utility not in UTILITIES:
        raise Logit2PromptError(f"unknown MBR utility {utility!r}; choose from {list(UTILITIES)}")
    if not hypotheses:
        raise Logit2PromptError("MBR needs at least one hypothesis")
    if not references:
        return hypotheses[0]
    u = UTILITIES[utility]
    cache: dict[tuple[str, str], float] = {}
    best_score = float("-inf")
    # A blank is never a hidden prompt; it wins only where every hypothesis is blank (two blank
    # samples agree perfectly with each other, so without this they could outvote the rest).
    distinct = [h for h in dict.fromkeys(hypotheses) if h.strip()] or [hypotheses[0]]
    best = distinct[0]
    for hyp in distinct:  # score each distinct string once
        total, count, skipped = 0.0, 0, False
        for ref in references:
            if ref == hyp and not skipped:
                skipped = True  # its own draw is no evidence for it
                continue
            key = (hyp, ref)
            if key not in cache:
                cache[key] = u(hyp, ref)
            total += cache[key]
            count += 1
        mean = total / count if count else 0.0
        if mean > best_score:
            best, best_score = hyp, mean
    return best


def mbr_select(
    greedy: Sequence[str], samples: Sequence[Sequence[str]], utility: str = DEFAULT_UTILITY
) -> list[str]:
    """Per row, the MBR choice among the greedy output and the samples, with the samples as
    pseudo-references."""
    if len(greedy) != len(samples):
        raise Logit2PromptError(f"{len(greedy)} greedy outputs but {len(samples)} sample groups")
    return [mbr_choice([g, *s], s, utility) for g, s in zip(greedy, samples, strict=True)]
