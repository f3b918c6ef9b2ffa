"""Collection throughput: the collect pipeline vs a naive loop vs the bare batched forward pass.

    python benchmarks/collect_throughput.py [--n 512] [--dtypes fp32 bf16]

Four ways over the same prompts in one process, so the ratios are comparable on a noisy
machine: (a) the collect pipeline into a store; (b) a naive one-prompt-at-a-time loop; (c) the
bare batched forward pass, left-padded, last-position logits only, nothing stored (the issue's
bound); (c') the pipeline's own forward (with the shared-prefix KV cache) with nothing stored,
the bound on what storing costs. Peak memory is measured in fresh subprocesses collecting N/4
and N prompts: it must not grow with corpus size. Writes benchmarks/results/collect_throughput.json.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from logit2prompt.data.collect import collect, collect_vectors
from logit2prompt.data.corpus import load_corpus, resolve_corpus
from logit2prompt.evaluation.results import write_results
from logit2prompt.targets import DEFAULT_TARGET, load_target

RESULTS = Path(__file__).parent / "results" / "collect_throughput.json"
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def naive_loop(target, texts: list[str]) -> None:
    """What a first script does: one prompt at a time, full logits at every position."""
    with torch.inference_mode():
        for text in texts:
            ids = target.tokenizer(
                target.render(text), return_tensors="pt", add_special_tokens=target.mode == "raw"
            )
            logits = target.model(**ids).logits
            torch.log_softmax(logits[0, -1].float(), dim=-1)


def bare_forward(target, texts: list[str], batch_size: int) -> None:
    """The bound: the same length-sorted batches, last-position logits only, nothing kept."""
    ids = target.encode(texts)
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = [ids[i] for i in order[start : start + batch_size]]
            width = max(len(x) for x in batch)
            input_ids = torch.full((len(batch), width), target.pad_id)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for j, x in enumerate(batch):
                input_ids[j, width - len(x) :] = torch.tensor(x)
                mask[j, width - len(x) :] = 1
            target.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                logits_to_keep=1,
            )


def bare_shared_forward(target, texts: list[str], batch_size: int) -> None:
    """The tight bound: the pipeline's own forward (shared-prefix cache, length-sorted
    batches, log-softmax) with nothing converted, checked or stored."""
    ids = target.encode(texts)
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    for start in range(0, len(order), batch_size):
        target.forward_ids([ids[i] for i in order[start : start + batch_size]], 1)


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def child_peak_rss(args, n: int, dtype: str) -> float:
    """Peak RSS (MiB) of a fresh process that collects n prompts into a new store."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "logit2prompt.cli.main",
            "collect",
            "--target",
            args.target,
            "--prompts",
            args.corpus,
            "--split",
            "train",
            "--limit",
            str(n),
            "--dtype",
            dtype,
            "--out",
            f"{tmp}/store",
            "--no-progress",
            "--batch-size",
            str(args.batch_size),
        ]
        code = (
            "import resource, subprocess, sys; "
            f"subprocess.run({cmd!r}, check=True, stdout=subprocess.DEVNULL); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], check=True, capture_output=True, text=True
        )
    return int(out.stdout.strip()) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=DEFAULT_TARGET)
    parser.add_argument("--prompts", default="bigbench")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument(
        "--naive-n", type=int, default=None, help="prompts for the naive loop (default: all N)"
    )
    args = parser.parse_args()
    args.corpus = resolve_corpus(args.prompts)
    rows = []
    for name in args.dtypes:
        target = load_target(args.target, dtype=DTYPES[name], batch_size=args.batch_size)
        corpus = load_corpus(
            args.corpus, count_tokens=target.count_tokens, split="train", limit=args.n
        )
        texts = corpus.texts
        collect_vectors(target, texts[: args.batch_size], 1, args.batch_size)  # warm-up
        with tempfile.TemporaryDirectory() as tmp:
            t_pipe = timed(
                collect, target, corpus, f"{tmp}/s", batch_size=args.batch_size, progress=False
            )
        t_bare = timed(bare_forward, target, texts, args.batch_size)
        t_shared = timed(bare_shared_forward, target, texts, args.batch_size)
        naive = texts[: args.naive_n or len(texts)]
        t_naive = timed(naive_loop, target, naive)
        row = {
            "dtype": name,
            "prompts": len(texts),
            "pipeline_prompts_per_s": len(texts) / t_pipe,
            "bare_forward_prompts_per_s": len(texts) / t_bare,
            "naive_prompts_per_s": len(naive) / t_naive,
            "bare_shared_prefix_prompts_per_s": len(texts) / t_shared,
        }
        row["pipeline_vs_bare_shared"] = (
            row["pipeline_prompts_per_s"] / row["bare_shared_prefix_prompts_per_s"]
        )
        row["pipeline_vs_bare"] = row["pipeline_prompts_per_s"] / row["bare_forward_prompts_per_s"]
        row["pipeline_vs_naive"] = row["pipeline_prompts_per_s"] / row["naive_prompts_per_s"]
        small, big = max(args.n // 4, args.batch_size), args.n
        row["peak_rss_mib"] = {
            str(small): child_peak_rss(args, small, name),
            str(big): child_peak_rss(args, big, name),
        }
        rows.append(row)

    header = (
        f"{'dtype':6} {'prompts':>7} {'pipeline/s':>10} {'bare/s':>7} {'shared/s':>8} "
        f"{'naive/s':>7} {'pipe/bare':>9} {'pipe/shared':>11} {'pipe/naive':>10}  "
        "peak RSS MiB (n: MiB)"
    )
    print(header)
    for r in rows:
        rss = ", ".join(f"{k}: {v:.0f}" for k, v in r["peak_rss_mib"].items())
        print(
            f"{r['dtype']:6} {r['prompts']:7d} {r['pipeline_prompts_per_s']:10.1f} "
            f"{r['bare_forward_prompts_per_s']:7.1f} "
            f"{r['bare_shared_prefix_prompts_per_s']:8.1f} {r['naive_prompts_per_s']:7.1f} "
            f"{r['pipeline_vs_bare']:9.2f} {r['pipeline_vs_bare_shared']:11.2f} "
            f"{r['pipeline_vs_naive']:10.2f}  {rss}"
        )
    write_results(
        RESULTS,
        {
            "benchmark": "collect_throughput",
            "target": args.target,
            "batch_size": args.batch_size,
            "peak_rss_note": "ru_maxrss of a fresh collect process",
            "rows": rows,
        },
        command=["python", *sys.argv],
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
