"""Functional similarity: does the recovered prompt make the target behave like the hidden one?

KL(target(. | hidden) || target(. | recovered)) of the next-token distributions, and whether
the two agree on the top token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

BATCH_SIZE = 32


def functional_scores(
    target,
    predictions: Sequence[str],
    references: Sequence[str],
    batch_size: int = BATCH_SIZE,
    reference_logprobs: torch.Tensor | None = None,
) -> dict[str, list[float]]:
    """Per pair: 'kl' in nats and 'top1' agreement (0/1).

    `reference_logprobs` `[n, vocab]`: the references' distributions when the caller already
    has them (an evaluation scores many methods against the same references).
    """
    # An empty guess is still a (templated) input in chat modes; raw mode needs a token.
    preds = [p if p.strip() or target.mode != "raw" else " " for p in predictions]
    kl, top1 = [], []
    for start in range(0, len(references), batch_size):
        end = start + batch_size
        if reference_logprobs is not None:
            ref = torch.as_tensor(reference_logprobs[start:end]).double()
        else:
            ref = target.next_token_logprobs(list(references[start:end])).double()
        got = target.next_token_logprobs(preds[start:end]).double()
        kl.extend((ref.exp() * (ref - got)).sum(-1).clamp(min=0).tolist())
        top1.extend((ref.argmax(-1) == got.argmax(-1)).double().tolist())
    return {"kl": kl, "top1": top1}
