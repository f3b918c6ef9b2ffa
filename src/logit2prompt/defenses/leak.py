"""A prompt-leak filter on replies, as prompt-leak guards run it: a reply that repeats enough of
the hidden system prompt is replaced by a refusal.

It stops extraction attacks ("repeat the message above") whose replies copy the prompt; it never
sees the log-prob attacker, who sends an innocuous user turn and reads distributions. What it
costs is the innocuous replies it blocks too (`evaluate` reports them).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..data.corpus import word_ngrams, words_of
from .chain import DefenseError

DEFAULT_LEAK_THRESHOLD = 0.5
REFUSAL = "I'm sorry, but I can't share that."
NGRAM = 3


def leak_score(reply: str, hidden: str) -> float:
    """Fraction of the hidden prompt's word 3-grams (fewer words: its whole word sequence)
    that the reply repeats, case and punctuation ignored."""
    words = words_of(hidden)
    if not words:
        return 0.0
    n = min(NGRAM, len(words))
    secret = word_ngrams(words, n)
    return len(secret & word_ngrams(words_of(reply), n)) / len(secret)


@dataclass(frozen=True)
class LeakFilter:
    """Refuse replies whose `leak_score` against the hidden prompt reaches `threshold`."""

    threshold: float = DEFAULT_LEAK_THRESHOLD
    refusal: str = REFUSAL

    def __post_init__(self):
        if not 0 < self.threshold <= 1:
            raise DefenseError(f"the leak threshold must be in (0, 1], got {self.threshold}")

    def blocks(self, reply: str, hidden: str) -> bool:
        return leak_score(reply, hidden) >= self.threshold

    def __call__(self, reply: str, hidden: str) -> str:
        return self.refusal if self.blocks(reply, hidden) else reply
