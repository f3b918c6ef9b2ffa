"""How long an inverter takes to decode and to sample candidates for the search, per prompt
and per generated token, at each precision, rows per batch and sampling loop.

    python benchmarks/decode_speed.py --checkpoint smollm2-135m-instruct-guarded --prompts 16

The observations are the first `--prompts` self-instruct seed tasks in the inverter's own
mode and turn (`--data`). Rows: greedy decoding, and `--samples` draws per prompt (temperature
1, top-k 50, top-p 0.95, as `observe_and_search(samples=N)`) at `--rows` observations per
batch, drawn by transformers' `generate` (the context decoded once per sample, every row to
the longest) and, for a prefix-lm, by its own loop (`sample_ids`: the context once per
observation, finished rows dropped, adapters folded). Writes
benchmarks/results/decode_speed.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from logit2prompt.attacks.invert import SAMPLING, target_for, user_turn_of
from logit2prompt.evaluation.results import write_results
from logit2prompt.inverter import Inverter
from logit2prompt.models.inverter import native_bf16
from logit2prompt.models.prefix_lm import PrefixLMInverter

RESULTS = Path(__file__).parent / "results" / "decode_speed.json"


@contextmanager
def sampling_loop(inverter, loop: str):
    """A prefix-lm that samples with its own loop ("sampler") or with transformers'
    `generate`, as it did before it had one."""
    if loop == "sampler":
        yield
        return

    def generate(vectors, neighbour_ids=None, **kwargs):
        context, mask = inverter.causal_context(vectors, neighbour_ids)
        limit = inverter.config.max_length
        return inverter.lm.generate(
            inputs_embeds=context,
            attention_mask=mask,
            do_sample=True,
            max_new_tokens=limit,
            **kwargs,
        )

    inverter.sample_ids = generate  # shadows the method for this instance only
    try:
        yield
    finally:
        del inverter.sample_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", default=str(Path(__file__).parents[2] / "shared" / "data"))
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--rows", type=int, nargs="+", default=[4, 16])
    parser.add_argument(
        "--loops", nargs="+", default=["generate", "sampler"], choices=["generate", "sampler"]
    )
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    inverter = Inverter.from_pretrained(args.checkpoint)
    target = target_for(inverter, batch_size=16)
    turn = user_turn_of(inverter.fingerprint.template, target)
    if turn is not None:
        target.set_user_turn(turn)
    lines = Path(args.data, "self_instruct_seed.jsonl").read_text().splitlines()
    prompts = [json.loads(line)["prompt"] for line in lines[: args.prompts]]
    observed = target.next_token_logprobs(prompts, steps=inverter.config.steps)
    tokenizer = inverter.tokenizer
    precisions = [True, False] if native_bf16("cpu") else [False]
    rows = []
    configs = [("greedy", 1, {}, len(prompts), "generate")]
    loops = args.loops if isinstance(inverter, PrefixLMInverter) else ["generate"]
    for r in args.rows:
        for loop in loops:
            configs.append((f"{args.samples} samples", args.samples, SAMPLING, r, loop))
    for name, n, kwargs, batch, loop in configs:
        for bf16 in precisions:
            torch.manual_seed(0)
            start = time.perf_counter()
            with sampling_loop(inverter, loop):
                out = inverter.invert(
                    observed,
                    num_return_sequences=n,
                    batch_size=batch,
                    bf16=bf16,
                    grouped=True,
                    **kwargs,
                )
            seconds = time.perf_counter() - start
            texts = [t for row in out for t in row]
            tokens = sum(len(tokenizer(t)["input_ids"]) for t in texts)
            rows.append(
                {
                    "decode": name,
                    "loop": loop,
                    "rows_per_batch": batch,
                    "precision": "bf16" if bf16 else "fp32",
                    "seconds": round(seconds, 2),
                    "seconds_per_prompt": round(seconds / len(prompts), 3),
                    "tokens": tokens,
                    "ms_per_token": round(1000 * seconds / max(1, tokens), 2),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    print("| decode | loop | rows per batch | precision | s per prompt | tokens | ms per token |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['decode']} | {r['loop']} | {r['rows_per_batch']} | {r['precision']} | "
            f"{r['seconds_per_prompt']} | {r['tokens']} | {r['ms_per_token']} |"
        )
    write_results(
        args.out,
        {"checkpoint": args.checkpoint, "prompts": len(prompts), "rows": rows},
        command=["python", *sys.argv],
    )


if __name__ == "__main__":
    main()
