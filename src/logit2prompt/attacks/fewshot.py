"""Few-shot baseline: show the target a few (top next tokens -> prompt) examples and ask it
to write the prompt behind a new distribution."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..targets.vocab import token_bytes, token_text

DEFAULT_SHOTS = 3
DEFAULT_TOP_TOKENS = 10
MAX_NEW_TOKENS = 48
INSTRUCTION = (
    "A language model read a hidden prompt and predicted its next token. Each example lists "
    "the most likely next tokens with their log-probabilities, then the hidden prompt. Write "
    "the hidden prompt of the last example, on one line."
)


def describe(vector: torch.Tensor, names: list[bytes], k: int = DEFAULT_TOP_TOKENS) -> str:
    """The top-k tokens of a log-prob vector as text: 'Paris' -0.12, 'The' -2.30, ..."""
    values, ids = vector.float().topk(k)
    return ", ".join(
        f"{token_text(names[i])!r} {v:.2f}"
        for i, v in zip(ids.tolist(), values.tolist(), strict=True)
    )


def fewshot_predictions(
    target,
    vectors: torch.Tensor,
    shots: Sequence[tuple[str, torch.Tensor]],
    *,
    top_tokens: int = DEFAULT_TOP_TOKENS,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> list[str]:
    """The target's guess of the prompt behind each vector `[n, vocab]`, from a few shots."""
    names = token_bytes(target.tokenizer, target.vocab_size)
    header = (
        INSTRUCTION
        + "\n\n"
        + "\n\n".join(
            f"Example {i + 1}\nNext tokens: {describe(v, names, top_tokens)}\nPrompt: {p}"
            for i, (p, v) in enumerate(shots)
        )
    )
    texts = []
    for v in vectors:
        shown = describe(v, names, top_tokens)
        body = f"{header}\n\nExample {len(shots) + 1}\nNext tokens: {shown}\nPrompt:"
        texts.append(
            body
            if target.mode == "raw"
            else target.render_messages([{"role": "user", "content": body}])
        )
    replies = target.complete(texts, max_new_tokens)
    # The model often answers "Prompt: ..." or adds more examples; keep the first line.
    out = []
    for r in replies:
        line = next((x for x in r.splitlines() if x.strip()), "").strip()
        out.append(line.removeprefix("Prompt:").strip())
    return out
