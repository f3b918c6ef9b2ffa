"""Functional similarity: does the recovered prompt make the target behave like the hidden one?

KL(target(. | hidden) || target(. | recovered)) of the next-token distributions, and whether
the two agree on the top token.
"""

from __future__ import annotations

from collections.abc import Sequence

BATCH_SIZE = 32


def functional_scores(
    target, predictions: Sequence[str], references: Sequence[str], batch_size: int = BATCH_SIZE
) -> dict[str, list[float]]:
    """Per pair: 'kl' in nats and 'top1' agreement (0/1)."""
    # An empty guess is still a (templated) input in chat modes; raw mode needs a token.
    preds = [p if p.strip() or target.mode != "raw" else " " for p in predictions]
    kl, top1 = [], []
    for start in range(0, len(references), batch_size):
        ref = target.next_token_logprobs(list(references[start : start + batch_size])).double()
        got = target.next_token_logprobs(preds[start : start + batch_size]).double()
        kl.extend((ref.exp() * (ref - got)).sum(-1).clamp(min=0).tolist())
        top1.extend((ref.argmax(-1) == got.argmax(-1)).double().tolist())
    return {"kl": kl, "top1": top1}
