"""Compact stores: bytes per prompt-step and reconstruction error against the model's own logits.

    python benchmarks/compact_store.py --store runs/steps/test [--steps 32] [--limit N]

A compact store keeps, per prompt and step, the fp32 final hidden state h (576 numbers for the
default target) instead of 49,152 log-probs; `DistributionStore.vectors` rebuilds
log_softmax(W.h). This checks that claim independently of the collection code path: for every
prompt of the store it runs the model's own forward pass (transformers' LM head, no KV cache,
the prompt followed by the greedy tokens the store implies) and compares its fp32 log-probs at
each step with the store's reconstruction: max abs error (nats), KL(model || store) per step,
and whether the greedy tokens agree. Sizes are read from the files on disk. Writes
benchmarks/results/compact_store.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from logit2prompt.attacks.invert import target_from_fingerprint
from logit2prompt.data.store import DistributionStore
from logit2prompt.evaluation.results import write_results

RESULTS = Path(__file__).parent / "results" / "compact_store.json"


def reference_logprobs(target, ids: list[list[int]], steps: int) -> torch.Tensor:
    """fp32 log-probs `[n, steps, vocab]` from the model's own forward over prompt + the
    first steps - 1 greedy tokens (left-padded batch, no cache)."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), target.pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, width - len(x) :] = torch.tensor(x)
        mask[i, width - len(x) :] = 1
    with torch.inference_mode():
        logits = target.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            logits_to_keep=steps,
        ).logits
    return torch.log_softmax(logits.float(), dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", required=True, help="a compact store (collect --format compact)")
    parser.add_argument("--steps", type=int, default=None, help="steps checked (default: all)")
    parser.add_argument("--limit", type=int, default=None, help="first N prompts (default: all)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))

    store = DistributionStore(args.store)
    if not store.compact:
        sys.exit(f"{args.store} is not a compact store")
    steps = args.steps or store.steps
    fp = store.fingerprint
    target = target_from_fingerprint(fp, batch_size=args.batch_size)
    store.attach(target)
    n = min(args.limit or len(store), len(store))
    prompt_ids = target.encode(store.prompts[:n])

    max_abs = 0.0
    kl_all: list[np.ndarray] = []
    token_agree = token_total = 0
    start = time.perf_counter()
    for lo in tqdm(range(0, n, args.batch_size), desc="check", unit="batch"):
        idx = list(range(lo, min(lo + args.batch_size, n)))
        rebuilt = torch.from_numpy(store.vectors(idx, steps))  # [b, steps, vocab]
        greedy = rebuilt.argmax(-1)  # the continuation the store implies
        ids = [prompt_ids[i] + greedy[j, : steps - 1].tolist() for j, i in enumerate(idx)]
        ref = reference_logprobs(target, ids, steps)
        max_abs = max(max_abs, float((ref - rebuilt).abs().max()))
        kl = (ref.exp() * (ref - rebuilt)).sum(-1)  # [b, steps]
        kl_all.append(kl.numpy())
        token_agree += int((ref.argmax(-1) == greedy).sum())
        token_total += greedy.numel()
    seconds = time.perf_counter() - start
    kl = np.concatenate(kl_all)

    files = list((store.path / "shards").glob("*.npy"))
    compact_bytes = sum(f.stat().st_size for f in files)
    stored_steps = n_all = len(store)
    per_step = compact_bytes / (n_all * store.steps)
    full_fp16 = store.vocab_size * 2
    results = {
        "store": str(args.store),
        "target": fp.describe(),
        "encoding": store.encoding,
        "prompts_checked": n,
        "steps_checked": steps,
        "prompt_steps_checked": int(kl.size),
        "bytes_per_prompt_step": {
            "compact_on_disk": round(per_step, 1),
            "compact_payload": store.bytes_per_step,
            "full_fp16": full_fp16,
            "full_fp32": store.vocab_size * 4,
        },
        "size_ratio_fp16_full_over_compact": round(full_fp16 / per_step, 2),
        "store_bytes": {
            "compact_on_disk": compact_bytes,
            "full_fp16_same_prompts_steps": full_fp16 * n_all * store.steps,
        },
        "max_abs_error_nats": max_abs,
        "kl_nats": {"mean": float(kl.mean()), "max": float(kl.max())},
        "greedy_token_agreement": token_agree / token_total,
        "check_seconds": round(seconds, 1),
        "stored_prompts": stored_steps,
    }
    print(f"{'bytes per prompt-step':<34} compact {per_step:8.1f}   fp16 full {full_fp16}")
    print(f"{'size ratio (fp16 full / compact)':<34} {full_fp16 / per_step:.2f}x")
    print(f"{'max abs error vs model logits':<34} {max_abs:.2e} nats over {kl.size} steps")
    print(f"{'KL(model || store)':<34} mean {kl.mean():.2e}  max {kl.max():.2e}")
    print(f"{'greedy tokens agree':<34} {100 * token_agree / token_total:.3f}%")
    write_results(args.out, results, command=["python", *sys.argv])


if __name__ == "__main__":
    main()
