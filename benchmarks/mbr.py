"""Minimum-Bayes-risk choice vs greedy decoding: utility, sample count and hypothesis set, all
from one sampling pass, paired per prompt.

    python benchmarks/mbr.py --checkpoint runs/instr/export-req2 --prompts runs/instr/mix.jsonl \\
        --split validation --samples 16 --out benchmarks/results/mbr-validation.json
    python benchmarks/mbr.py --checkpoint runs/instr/export-req2 --ood ../shared/data --limit 100 \\
        --samples 16 --out benchmarks/results/mbr-ood.json

The checkpoint's target reads the prompts in the checkpoint's threat model (in guarded mode
through the demo's leak filter, which also refuses observations: a refused one predicts "");
the inverter decodes greedily once and samples `--samples` prompts per observation once
(`MethodContext.samples`: temperature 1, top-k 50, top-p 0.95, seed 0). Rows: greedy; MBR with each
utility (`attacks.mbr.UTILITIES`) over the greedy output and the samples; the default utility
with the first 4 and 8 samples; and the default with the observed reply (the greedy
continuation the attacker read) as one more hypothesis. Each row's paired gain over greedy
(95% bootstrap CI). `--ood` reads the same seeded prompts as benchmarks/shipped_ood.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from logit2prompt.attacks.invert import target_for
from logit2prompt.attacks.mbr import DEFAULT_UTILITY, UTILITIES, mbr_choice
from logit2prompt.data.corpus import split_of
from logit2prompt.defenses.leak import LeakFilter
from logit2prompt.evaluation.metrics import format_ci, paired_gain, score
from logit2prompt.evaluation.results import write_results
from logit2prompt.models.inverter import Inverter, native_bf16
from logit2prompt.recipes.methods import MethodContext

sys.path.insert(0, str(Path(__file__).parent))
from shipped_ood import rows_of  # noqa: E402  (the OOD prompts shipped_ood.py scores)

RESULTS = Path(__file__).parent / "results" / "mbr.json"
LEAK_THRESHOLD = 0.5  # the demo's


def load_rows(args, tokenizer) -> list[dict]:
    if args.ood:
        return rows_of(Path(args.ood), args.limit, args.seed)
    rows = []
    for line in Path(args.prompts).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        prompt = json.loads(line)["prompt"]
        if args.split and split_of(prompt) != args.split:
            continue
        if len(tokenizer(prompt)["input_ids"]) > args.max_tokens:
            continue
        rows.append({"prompt": prompt, "set": args.split or "prompts"})
    return rows[: args.limit] if args.limit else rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help="JSONL with a prompt field (a `data mix` corpus)")
    src.add_argument("--ood", help="folder with the OOD .jsonl files (as shipped_ood.py)")
    parser.add_argument("--split", default=None, help="with --prompts: this hash split only")
    parser.add_argument("--limit", type=int, default=None, help="prompts (per set with --ood)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="the OOD prompts' sampling seed")
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if args.ood and args.limit is None:
        args.limit = 100
    if args.samples < 8:
        parser.error("--samples must be at least 8 (rows use the first 4 and 8)")

    inverter = Inverter.from_pretrained(args.checkpoint)
    target = target_for(inverter, batch_size=args.batch_size)
    rows = load_rows(args, target.tokenizer)
    prompts = [r["prompt"] for r in rows]
    mode = inverter.fingerprint.mode
    leak = LeakFilter(LEAK_THRESHOLD) if mode == "guarded" else None
    t0 = time.perf_counter()
    vectors = target.next_token_logprobs(prompts, steps=inverter.config.steps).numpy()
    ctx = MethodContext(
        inverter,
        vectors,
        target=target,
        references=prompts,
        batch_size=args.batch_size,
        bf16=native_bf16(inverter.feature_mean.device.type),
    )
    t1 = time.perf_counter()
    greedy = ctx.inverter_output()
    t2 = time.perf_counter()
    samples = ctx.samples(args.samples)
    t3 = time.perf_counter()
    replies = ctx.replies()

    def mbr(utility=DEFAULT_UTILITY, n=args.samples, reply=False) -> list[str]:
        out = []
        for g, s, r in zip(greedy, samples, replies, strict=True):
            hyps = [g, *s[:n], *([r] if reply and r else [])]
            out.append(mbr_choice(hyps, s[:n], utility))
        return out

    preds = {"greedy": greedy}
    for utility in UTILITIES:
        preds[f"MBR {utility}, {args.samples} samples"] = mbr(utility)
    for n in (4, 8):
        preds[f"MBR {DEFAULT_UTILITY}, {n} samples"] = mbr(n=n)
    preds[f"MBR {DEFAULT_UTILITY}, {args.samples} samples + the reply"] = mbr(reply=True)
    preds["the observed reply"] = list(replies)
    refused = [leak.blocks(r, p) if leak else False for r, p in zip(replies, prompts, strict=True)]
    preds = {k: ["" if b else p for b, p in zip(refused, v, strict=True)] for k, v in preds.items()}

    results: dict = {
        "checkpoint": args.checkpoint,
        "target": target.fingerprint.to_dict(),
        "samples": args.samples,
        "observation_refused": sum(refused),
        "seconds": {"observe": t1 - t0, "greedy": t2 - t1, "sample": t3 - t2},
        "sets": {},
    }
    lines = ["| set | row | BLEU / F1 | − greedy BLEU | − greedy F1 |", "| --- " * 5 + "|"]
    for group in dict.fromkeys(r["set"] for r in rows):
        idx = [i for i, r in enumerate(rows) if r["set"] == group]
        refs = [prompts[i] for i in idx]
        table = {}
        for name, p in preds.items():
            mine = [p[i] for i in idx]
            table[name] = score(mine, refs)
            cells = [f"{table[name]['bleu']['mean']:.1f} / {table[name]['token_f1']['mean']:.1f}"]
            if name != "greedy":
                gain = paired_gain(mine, [preds["greedy"][i] for i in idx], refs)
                table[name]["gain_over greedy"] = gain
                cells += [format_ci(gain["bleu"], "+.1f"), format_ci(gain["token_f1"], "+.1f")]
            else:
                cells += ["", ""]
            lines.append(f"| {group} | {name} | " + " | ".join(cells) + " |")
        results["sets"][group] = {"n": len(idx), "rows": table}
    results["examples"] = [
        {"hidden": p, "set": r["set"], **{k: v[i] for k, v in preds.items()}, "samples": samples[i]}
        for i, (p, r) in enumerate(zip(prompts, rows, strict=True))
    ]
    write_results(args.out, results, command=["python", *sys.argv])
    print(f"{len(prompts)} prompts; {sum(refused)} observations refused; sampling {t3 - t2:.0f} s")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
