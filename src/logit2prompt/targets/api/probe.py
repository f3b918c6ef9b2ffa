"""`logit2prompt probe-api`: what an endpoint exposes, its hidden size, and what recovery costs.

The hidden size comes from API answers alone (Carlini et al. 2024, arXiv 2403.06634; Finlayson
et al. 2024, arXiv 2403.09539): every next-token log-prob vector of a softmax LM is an affine
image of its d-dimensional final hidden state, so the matrix of subset observations over more
than d prompts has rank d (d + 1 with an output bias). The estimate is where the singular
values drop most steeply; an endpoint that adds noise or quantises shows no such cliff.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..subset import SUBSET_MARGIN, TokenSubset, eligible_ids
from .strategies import query_cost

logger = logging.getLogger(__name__)

PROBE_PROMPTS = 768  # more than the hidden size of most models one probes on a CPU
PROBE_TOKENS = 1024
CLIFF_RATIO = 100.0  # a drop of this factor between neighbouring singular values is a rank


def random_prompts(tokenizer, n: int, seed: int = 0) -> list[str]:
    """`n` distinct seeded prompts of 4 to 16 random tokens: varied hidden states, no corpus."""
    pool = np.asarray(eligible_ids(tokenizer, len(tokenizer)))
    rng = np.random.default_rng(seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        ids = rng.choice(pool, int(rng.integers(4, 17))).tolist()
        text = tokenizer.decode(ids).strip()
        if text and text not in seen:
            seen.add(text)
            out.append(text)
    return out


def estimate_rank(singular: np.ndarray) -> tuple[int, float]:
    """(rank, drop factor at it): the index after which singular values fall the most."""
    s = np.asarray(singular, dtype=np.float64)
    s = s[s > 0]
    if len(s) < 2:
        return len(s), 1.0
    drops = s[:-1] / s[1:]
    i = int(np.argmax(drops))
    return i + 1, float(drops[i])


def probe_endpoint(
    target,
    *,
    prompts: int = PROBE_PROMPTS,
    tokens: int = PROBE_TOKENS,
    seed: int = 0,
    plot: str | Path | None = None,
) -> dict:
    """Probe an `OpenAITarget`: exposure, hidden size (subset observations of `prompts`
    random prompts over `tokens` seeded tokens) and the query cost of each strategy."""
    strategy, k = target.probe()
    report: dict = {
        "endpoint": target.transport.name,
        "exposes": {
            "top_k": k,
            "logprobs": {"bias-block": "after logit_bias", "force": "before logit_bias"}.get(
                strategy, "none" if k == 0 else "after logit_bias, top-1 only"
            ),
            "sampled_token_logprob": strategy == "force",
        },
        "strategy": strategy,
        "probe_queries": target.probe_queries,
    }
    vocab = target.vocab_size
    subset = TokenSubset.choose(target.tokenizer, vocab, min(tokens, vocab), seed)
    texts = random_prompts(target.tokenizer, prompts, seed)
    before = target.sent
    obs = target.observe_subset(texts, subset)[:, 0].astype(np.float64)
    singular = np.linalg.svd(obs, compute_uv=False)
    rank, drop = estimate_rank(singular)
    ceiling = min(prompts, subset.size) - 1
    found = drop >= CLIFF_RATIO and rank < ceiling
    hidden = rank if found else None
    report["hidden_size"] = {
        "estimate": hidden,
        "rank": rank,
        "drop_at_rank": drop,
        "prompts": prompts,
        "subset_tokens": subset.size,
        "queries": target.sent - before,
        "note": (
            "rank of centred subset observations: the hidden size (one more with an output bias)"
            if found
            else f"no cliff of {CLIFF_RATIO:g}x below {ceiling}: noise, quantisation or a "
            "defense, or a hidden size beyond what this many prompts and tokens can show"
        ),
        "singular_values": singular.tolist(),
    }
    size = (hidden or 0) + SUBSET_MARGIN
    costs = {}
    for name in ("bias-block", "force", "gap"):
        top = k if name == "bias-block" else max(k, 1)
        if name == "bias-block" and k < 2:
            continue
        costs[name] = {
            "full": query_cost(name, top, vocab, target.bias, target.tolerance),
            "subset": query_cost(name, top, size, target.bias, target.tolerance)
            if hidden
            else None,
        }
    report["query_cost_per_step"] = {"subset_tokens": size if hidden else None, **costs}
    if plot:
        plot_singular_values(singular, rank, hidden, plot, report["endpoint"])
        report["plot"] = str(plot)
    return report


def plot_singular_values(singular, rank: int, hidden, path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.semilogy(np.arange(1, len(singular) + 1), np.maximum(singular, 1e-12), lw=1.2)
    label = f"hidden size {hidden}" if hidden else f"largest drop after {rank} (no clear cliff)"
    ax.axvline(rank, color="tab:red", ls="--", lw=1, label=label)
    ax.set_xlabel("index")
    ax.set_ylabel("singular value")
    ax.set_title(f"subset observations of {title}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_probe(report: dict) -> str:
    """The probe's findings as a few lines of text."""
    ex, hs = report["exposes"], report["hidden_size"]
    lines = [
        f"endpoint: {report['endpoint']}",
        f"exposes: top-{ex['top_k']} log-probs, {ex['logprobs']}; sampled token's log-prob "
        f"always shown: {'yes' if ex['sampled_token_logprob'] else 'no'}",
        f"recovery strategy: {report['strategy']}",
        f"hidden size: {hs['estimate'] if hs['estimate'] else 'not found'} (rank {hs['rank']}, "
        f"drop {hs['drop_at_rank']:.3g}x, {hs['prompts']} prompts x {hs['subset_tokens']} "
        f"tokens, {hs['queries']} queries)",
        "queries per step:",
    ]
    costs = report["query_cost_per_step"]
    for name, c in costs.items():
        if name == "subset_tokens":
            continue
        sub = f", subset of {costs['subset_tokens']}: {c['subset']}" if c["subset"] else ""
        lines.append(f"  {name}: full vector {c['full']}{sub}")
    if report.get("plot"):
        lines.append(f"singular values: {report['plot']}")
    return "\n".join(lines)
