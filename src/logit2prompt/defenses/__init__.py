"""Defenses a provider applies to exposed log-probs (`chain`), and the leakage-vs-utility sweep
(`sweep`)."""

from .chain import FLOOR, Defense, DefenseChain, DefenseError, DefenseLogitsProcessor, parse_defense

__all__ = [
    "FLOOR",
    "Defense",
    "DefenseChain",
    "DefenseError",
    "DefenseLogitsProcessor",
    "parse_defense",
]
