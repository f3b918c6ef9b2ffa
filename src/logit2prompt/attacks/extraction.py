"""Extraction-attack baseline ("jailbreaks"): ask the target itself to give the prompt back.

The hidden prompt goes into the chat template as the threat model says (the user turn, with
the attack string after it; or the system turn, with the attack as the user turn), and the
target's greedy reply is the prediction. As in the paper, we report the best single string and
the per-prompt oracle over all strings (an upper bound no real attacker reaches without
knowing the answer).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np

from ..errors import Logit2PromptError
from ..evaluation.metrics import sentence_bleu
from ..targets.base import SYSTEM_MODES, system_message

ATTACK_SEPARATOR = "\n\n"
DEFAULT_MAX_NEW_TOKENS = 64


def load_attacks(path: str | Path | None = None) -> list[str]:
    """Attack strings from a JSON file (a list, or groups of lists); ours by default."""
    if path is None:
        text = (
            resources.files("logit2prompt.attacks").joinpath("extraction_attacks.json").read_text()
        )
    else:
        text = Path(path).read_text(encoding="utf-8")
    data = json.loads(text)
    groups = data if isinstance(data, list) else [v for k, v in data.items() if k[:1] != "_"]
    flat = [s for g in groups for s in (g if isinstance(g, list) else [g])]
    if not flat or not all(isinstance(s, str) and s.strip() for s in flat):
        raise Logit2PromptError(f"no usable attack strings in {path or 'the built-in list'}")
    return flat


def attack_input(target, prompt: str, attack: str) -> str:
    """What the target reads: the hidden prompt placed by its threat model, then the attack."""
    if target.mode == "raw":
        return prompt + ATTACK_SEPARATOR + attack
    if target.mode in SYSTEM_MODES:
        messages = [
            {"role": "system", "content": system_message(prompt, target.mode)},
            {"role": "user", "content": attack},
        ]
    else:
        messages = [{"role": "user", "content": prompt + ATTACK_SEPARATOR + attack}]
        if target.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": target.system_prompt})
    return target.render_messages(messages)


def extraction_predictions(
    target,
    prompts: Sequence[str],
    attacks: Sequence[str],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> dict[str, list[str]]:
    """The target's reply to each attack string, for every hidden prompt."""
    return {
        attack: target.complete([attack_input(target, p, attack) for p in prompts], max_new_tokens)
        for attack in attacks
    }


def best_and_oracle(
    replies: dict[str, list[str]], references: Sequence[str]
) -> tuple[str, list[str], list[str]]:
    """The attack string with the best mean BLEU, its replies, and the per-prompt oracle."""
    bleu = {
        a: [sentence_bleu(p, r) for p, r in zip(ps, references, strict=True)]
        for a, ps in replies.items()
    }
    best = max(bleu, key=lambda a: float(np.mean(bleu[a])))
    attacks = list(replies)
    oracle = []
    for i in range(len(references)):
        winner = max(attacks, key=lambda a: bleu[a][i])
        oracle.append(replies[winner][i])
    return best, replies[best], oracle
