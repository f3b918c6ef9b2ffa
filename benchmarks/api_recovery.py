"""Full-distribution recovery through OpenAI-compatible APIs: query cost, time and error.

    python benchmarks/api_recovery.py [--prompts 2] [--sample 300]
        [--llamacpp-python /path/to/venv/bin/python]

Part 1 serves the embedded default target with `logit2prompt serve` on loopback, in each
exposure setting (log-probs after / before logit_bias, top-k in {1, 5, 20}, none at all, and
one defended setting), recovers next-token distributions with `OpenAITarget`, and compares
them with the white-box vectors of the same target: max |log-prob difference| and KL.

Strategies whose full cost fits the run (bias-block, force) recover every one of the 49,152
entries; the "gap" bisection costs ~17 queries per token, so it recovers `--sample` entries
(the white-box top 20 plus random ones) and the table gives its full cost by formula, relative
to the top token.

Part 2 (with --llamacpp-python) runs llama-cpp-python's own OpenAI-compatible server on the
same GGUF and recovers a sample of entries (the server's reported top 20 plus random ones),
checked against the top log-probs that server reports directly. llama.cpp's quantised kernels
differ from transformers' dequantised fp32, so its numbers are compared with its own.

Part 3 (`--subset`) asks only for a token subset S of hidden size + 100 = 676 tokens
(targets/subset.py): queries and seconds per step at top-5 and top-20 after the bias and with
`force` before it, max |error| of the S observations vs white-box, and of full vectors rebuilt
from S through the white-box output layer (`--basis-from`); `probe-api`'s hidden-size reading
from API answers alone; and the end-to-end check: an inverter trained white-box on S
(`--checkpoint`) applied to `--e2e-prompts` test prompts collected through the server vs the
same prompts' white-box observations. `--subset-only` keeps parts 1 and 2 from the last run.

Writes benchmarks/results/api_recovery.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from logit2prompt.evaluation.results import write_results
from logit2prompt.targets import DEFAULT_TARGET, load_target
from logit2prompt.targets.api.target import OpenAITarget
from logit2prompt.targets.embedded import gguf_path
from logit2prompt.testing import free_port, server_process

RESULTS = Path(__file__).parent / "results"
PROMPTS = [
    "What is the capital of France?",
    "Translate the following sentence into German: the weather is nice today.",
    "Which of these numbers is prime: 21, 23, 25?",
]
# (label, serve flags, recover the whole vocabulary?)
SETTINGS = [
    ("after, top-20", ["--max-top-logprobs", "20"], True),
    ("after, top-5", ["--max-top-logprobs", "5"], True),
    ("after, top-1", ["--max-top-logprobs", "1"], False),
    ("before, top-5", ["--max-top-logprobs", "5", "--logprobs-mode", "before"], True),
    # "force" costs V queries whatever k is: sample entries for the other two k.
    ("before, top-1", ["--max-top-logprobs", "1", "--logprobs-mode", "before"], False),
    ("before, top-20", ["--max-top-logprobs", "20", "--logprobs-mode", "before"], False),
    ("no log-probs", ["--max-top-logprobs", "0"], False),
    ("after, top-5, round:2", ["--max-top-logprobs", "5", "--defense", "round:2"], True),
]


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    """KL(p || q) in nats for full log-prob vectors."""
    return float((p_log.exp() * (p_log - q_log)).sum())


def sample_ids(vocab: int, must: list[int], n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    rest = rng.sample([i for i in range(vocab) if i not in set(must)], max(0, n - len(must)))
    return sorted(set(must) | set(rest))


@contextlib.contextmanager
def serving(flags):
    port = free_port()
    cmd = [sys.executable, "-m", "logit2prompt.cli.main", "serve", "--port", str(port)]
    cmd += ["--model-name", DEFAULT_TARGET, *flags]
    url = f"http://127.0.0.1:{port}/v1"
    with server_process(cmd, url + "/models", timeout=300):
        yield url


def run_setting(label, flags, full, args, white, tmp) -> dict:
    with serving(flags) as url:
        target = OpenAITarget(
            url,
            DEFAULT_TARGET,
            tokenizer=white.tokenizer,
            cache_path=Path(tmp) / f"{label}.sqlite",  # fresh cache: count real queries
            concurrency=args.concurrency,
            progress=True,
        )
        strategy, k = target.probe()
        rows = []
        for i, prompt in enumerate(PROMPTS[: args.prompts]):
            truth = white.next_token_logprobs([prompt])[0]
            ids = None
            if not full:
                ids = sample_ids(len(truth), truth.topk(20).indices.tolist(), args.sample, i)
            start = time.perf_counter()
            vec, report = target.recover(prompt, token_ids=ids)
            seconds = time.perf_counter() - start
            if ids is None:
                err = float((vec - truth).abs().max())
                div = kl(truth, vec.double().log_softmax(0).float())
                mass = float(vec.double().exp().sum())
            else:  # partial: "gap" gives log-probs relative to the top token
                sel = torch.tensor(ids)
                ref = truth.max() if strategy == "gap" else 0.0
                err = float((vec[sel] - (truth[sel] - ref)).abs().max())
                div, mass = None, None
            rows.append(
                {
                    "queries": report.queries,
                    "seconds": seconds,
                    "entries": len(ids) if ids else len(truth),
                    "max_abs_err": err,
                    "kl": div,
                    "mass": mass,
                    "unresolved": report.unresolved,
                }
            )
        per_query = sum(r["seconds"] for r in rows) / max(1, sum(r["queries"] for r in rows))
        full_cost = target.query_cost(strategy, k) if strategy != "bias-block" or k > 1 else None
        return {
            "setting": label,
            "strategy": strategy,
            "top_k": k,
            "full": full,
            "queries_per_distribution": full_cost,
            "seconds_per_query": per_query,
            "seconds_per_distribution": per_query * full_cost if full_cost else None,
            "max_abs_err": max(r["max_abs_err"] for r in rows),
            "kl": max((r["kl"] for r in rows if r["kl"] is not None), default=None),
            "unresolved": sum(r["unresolved"] for r in rows),
            "prompts": rows,
        }


@contextlib.contextmanager
def llamacpp_target(args, white, cache: Path, progress: bool):
    """llama-cpp-python's own OpenAI-compatible server on the GGUF, as an OpenAITarget."""
    port = free_port()
    cmd = [args.llamacpp_python, "-m", "llama_cpp.server", "--model", str(gguf_path())]
    cmd += ["--logits_all", "true", "--port", str(port), "--n_ctx", "2048"]
    cmd += ["--model_alias", "smol", "--verbose", "false"]
    url = f"http://127.0.0.1:{port}/v1"
    with server_process(cmd, url + "/models", timeout=300):
        yield OpenAITarget(
            url,
            "smol",
            tokenizer=white.tokenizer,
            cache_path=cache,
            concurrency=1,  # llama-cpp-python serves one request at a time
            progress=progress,
        )


def run_llamacpp(args, white, tmp) -> dict:
    with llamacpp_target(args, white, Path(tmp) / "llamacpp.sqlite", True) as target:
        strategy, k = target.probe()
        rows = []
        for i, prompt in enumerate(PROMPTS[: args.prompts]):
            top = target.reported_top(prompt, 20)
            ids = sample_ids(white.vocab_size, list(top), args.llamacpp_sample, i)
            start = time.perf_counter()
            vec, report = target.recover(prompt, token_ids=ids)
            seconds = time.perf_counter() - start
            errs = [abs(float(vec[t]) - v) for t, v in top.items()]
            truth = white.next_token_logprobs([prompt])[0]
            sel = torch.tensor(ids)
            ok = ~torch.isnan(vec[sel])
            vs_hf = float((vec[sel][ok] - truth[sel][ok]).abs().median())
            rows.append(
                {
                    "queries": report.queries,
                    "seconds": seconds,
                    "entries": len(ids),
                    "checked_against_reported": len(errs),
                    "max_abs_err_vs_reported": max(errs) if errs else None,
                    "median_abs_diff_vs_transformers": vs_hf,
                    "unresolved": report.unresolved,
                }
            )
        per_query = sum(r["seconds"] for r in rows) / max(1, sum(r["queries"] for r in rows))
        full_cost = target.query_cost(strategy, k)
        return {
            "setting": "llama-cpp-python server",
            "strategy": strategy,
            "top_k": k,
            "queries_per_distribution": full_cost,
            "seconds_per_query": per_query,
            "seconds_per_distribution": per_query * full_cost,
            "max_abs_err_vs_reported": max((r["max_abs_err_vs_reported"] or 0.0) for r in rows),
            "median_abs_diff_vs_transformers": max(
                r["median_abs_diff_vs_transformers"] for r in rows
            ),
            "unresolved": sum(r["unresolved"] for r in rows),
            "prompts": rows,
        }


SUBSET_SETTINGS = [
    ("after, top-5", ["--max-top-logprobs", "5"]),
    ("after, top-20", ["--max-top-logprobs", "20"]),
    ("before, top-5", ["--max-top-logprobs", "5", "--logprobs-mode", "before"]),
]


def api_target(url, white, cache, args) -> OpenAITarget:
    return OpenAITarget(
        url,
        DEFAULT_TARGET,
        tokenizer=white.tokenizer,
        cache_path=cache,
        concurrency=args.concurrency,
        progress=False,
    )


def run_subset(label, flags, args, white, subset, prompts, tmp) -> dict:
    """S observations and full reconstructions through one exposure setting."""
    basis = white.output_basis()
    with serving(flags) as url:
        target = api_target(url, white, Path(tmp) / f"subset-{label}.sqlite", args)
        strategy, k = target.probe()
        truth = white.next_token_logprobs(prompts)
        start, sent = time.perf_counter(), target.sent
        obs = target.observe_subset(prompts, subset)[:, 0]
        seconds = time.perf_counter() - start
        queries = target.sent - sent
        obs_err = float(abs(obs - subset.observe(truth).numpy()).max())
        target.use_basis(basis, subset)
        start, sent = time.perf_counter(), target.sent
        # S comes from the cache of the observation above: only the check tokens are asked.
        full = target.next_token_logprobs(prompts)
        full_seconds = seconds + time.perf_counter() - start
        full_queries = queries + target.sent - sent
        report = dict(target.subset_report)
    return {
        "setting": label,
        "strategy": strategy,
        "top_k": k,
        "subset_tokens": subset.size,
        "queries_per_step": queries / len(prompts),
        "seconds_per_step": seconds / len(prompts),
        "full_queries_per_distribution": target.query_cost(strategy, k),
        "max_abs_err_subset": obs_err,
        "reconstruction_queries_per_step": full_queries / len(prompts),
        "reconstruction_seconds_per_step": full_seconds / len(prompts),
        "max_abs_err_full": float((full - truth).abs().max()),
        "kl_full": max(kl(t, f) for t, f in zip(truth, full, strict=True)),
        "reconstruction": report,
        "prompts": len(prompts),
    }


def run_probe(args, white, tmp) -> dict:
    from logit2prompt.targets.api.probe import probe_endpoint

    with serving(["--max-top-logprobs", "20"]) as url:
        target = api_target(url, white, Path(tmp) / "probe.sqlite", args)
        start = time.perf_counter()
        report = probe_endpoint(target, plot=RESULTS / "api_probe.png")
        report["seconds"] = time.perf_counter() - start
    report["plot"] = "benchmarks/results/api_probe.png"
    report["hidden_size_white_box"] = white.output_basis().width
    return report


def run_e2e(args, white, subset, tmp) -> dict:
    """The white-box-trained subset inverter on API-collected vs white-box observations."""
    from logit2prompt.data.store import DistributionStore
    from logit2prompt.evaluation.metrics import paired_gain, score
    from logit2prompt.models.inverter import Inverter

    model = Inverter.from_pretrained(args.checkpoint)
    if model.token_subset != subset:
        raise SystemExit(f"{args.checkpoint} does not read the benchmark's token subset")
    store = DistributionStore(args.test)
    idx = sorted(random.Random(0).sample(range(len(store)), args.e2e_prompts))
    prompts = [store.prompts[i] for i in idx]
    white_obs = store.observations(idx, 1, subset)
    with serving(["--max-top-logprobs", "5"]) as url:
        target = api_target(url, white, Path(tmp) / "e2e.sqlite", args)
        start, sent = time.perf_counter(), target.sent
        api_obs = target.observe_subset(prompts, subset)
        seconds, queries = time.perf_counter() - start, target.sent - sent
    white_pred = model.invert(white_obs, batch_size=32)
    api_pred = model.invert(api_obs, batch_size=32)
    white_score, api_score = score(white_pred, prompts), score(api_pred, prompts)
    lo, hi = white_score["bleu"]["ci95"]
    return {
        "checkpoint": args.checkpoint,
        "test_store": args.test,
        "prompts": len(prompts),
        "api_setting": "after, top-5",
        "queries_per_prompt": queries / len(prompts),
        "seconds_per_prompt": seconds / len(prompts),
        "max_abs_err_subset": float(abs(api_obs - white_obs).max()),
        "identical_predictions": sum(a == w for a, w in zip(api_pred, white_pred, strict=True)),
        "white_box": white_score,
        "api": api_score,
        "api_minus_white_box": paired_gain(api_pred, white_pred, prompts),
        "api_bleu_within_white_box_ci": lo <= api_score["bleu"]["mean"] <= hi,
    }


def run_llamacpp_subset(args, white, subset, tmp) -> dict:
    """S through llama-cpp-python's own server (force, before the bias): cost, agreement with
    the top-20 it reports, and the white-box basis's residual on its quantised answers."""
    from logit2prompt.targets.subset import SubsetDecoder

    decoder = SubsetDecoder(subset, white.output_basis())
    rows = []
    cache = Path(tmp) / "llamacpp-subset.sqlite"
    with llamacpp_target(args, white, cache, False) as target:
        strategy, k = target.probe()
        for prompt in PROMPTS[: args.prompts]:
            start, sent = time.perf_counter(), target.sent
            vec, report = target.recover(prompt, subset.ids)
            seconds, queries = time.perf_counter() - start, target.sent - sent
            top = target.reported_top(prompt, 20)
            shared = [t for t in top if t in set(subset.ids)]
            obs = subset.observe(vec).numpy()
            truth = subset.observe(white.next_token_logprobs([prompt])[0]).numpy()
            _, residual = decoder.decode(obs[None], tolerance=None)
            rows.append(
                {
                    "queries": queries,
                    "seconds": seconds,
                    "unresolved": report.unresolved,
                    "reported_top_in_subset": len(shared),
                    "max_abs_err_vs_reported": max(
                        (abs(float(vec[t]) - top[t]) for t in shared), default=None
                    ),
                    "median_abs_diff_vs_transformers": float(np.median(np.abs(obs - truth))),
                    "white_box_basis_residual": float(residual[0]),
                }
            )
    return {
        "setting": "llama-cpp-python server",
        "strategy": strategy,
        "top_k": k,
        "subset_tokens": subset.size,
        "queries_per_step": sum(r["queries"] for r in rows) / len(rows),
        "seconds_per_step": sum(r["seconds"] for r in rows) / len(rows),
        "prompts": rows,
    }


def subset_part(args, white) -> dict:
    from logit2prompt.targets.subset import TokenSubset, default_subset_size

    size = default_subset_size(white.output_basis().width)
    subset = TokenSubset.choose(white.tokenizer, white.vocab_size, size, seed=0)
    out: dict = {"subset": subset.describe(), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for label, flags in SUBSET_SETTINGS:
            print(f"== subset: {label}", flush=True)
            out["rows"].append(
                run_subset(label, flags, args, white, subset, PROMPTS[: args.prompts], tmp)
            )
        if args.llamacpp_python:
            print("== subset: llama-cpp-python", flush=True)
            out["llamacpp"] = run_llamacpp_subset(args, white, subset, tmp)
        if args.skip_probe:
            return out
        print("== probe", flush=True)
        out["probe"] = run_probe(args, white, tmp)
        if args.checkpoint:
            print("== end to end", flush=True)
            out["end_to_end"] = run_e2e(args, white, subset, tmp)
    return out


def print_subset(part: dict) -> None:
    print(
        f"\ntoken subset {part['subset']}\n{'setting':16} {'strategy':10} {'k':>3} "
        f"{'queries/step':>12} {'full':>7} {'s/step':>7} {'max|err| S':>10} "
        f"{'max|err| full':>13} {'fallbacks':>9}"
    )
    for r in part["rows"]:
        print(
            f"{r['setting']:16} {r['strategy']:10} {r['top_k']:3d} "
            f"{r['queries_per_step']:12.0f} {r['full_queries_per_distribution']:7d} "
            f"{r['seconds_per_step']:7.2f} {r['max_abs_err_subset']:10.2e} "
            f"{r['max_abs_err_full']:13.2e} {r['reconstruction']['fallbacks']:9d}"
        )
    llama = part.get("llamacpp")
    if llama:
        worst = max(r["white_box_basis_residual"] for r in llama["prompts"])
        print(
            f"llama-cpp-python: {llama['strategy']}, {llama['queries_per_step']:.0f} queries/step,"
            f" {llama['seconds_per_step']:.1f} s/step; white-box basis residual {worst:.2e}"
        )
    if "probe" in part:
        hs, probe = part["probe"]["hidden_size"], part["probe"]
        print(
            f"probe: hidden size {hs['estimate']} (white-box {probe['hidden_size_white_box']}"
            f"; drop {hs['drop_at_rank']:.3g}x; {hs['queries']} queries, {probe['seconds']:.0f} s)"
        )
    e2e = part.get("end_to_end")
    if e2e:
        w, a, g = e2e["white_box"], e2e["api"], e2e["api_minus_white_box"]
        print(
            f"end to end ({e2e['prompts']} prompts): white-box BLEU {w['bleu']['mean']:.1f} "
            f"{w['bleu']['ci95']}, API {a['bleu']['mean']:.1f} {a['bleu']['ci95']}, paired "
            f"{g['bleu']['mean']:+.2f} {g['bleu']['ci95']}; identical predictions "
            f"{e2e['identical_predictions']}/{e2e['prompts']}"
        )


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--sample", type=int, default=120, help="entries for partial runs")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--only", nargs="*", default=None, help="labels of settings to run")
    parser.add_argument("--llamacpp-python", default=None, help="python with llama-cpp-python")
    parser.add_argument("--llamacpp-sample", type=int, default=300)
    parser.add_argument("--subset", action="store_true", help="part 3: token-subset queries")
    parser.add_argument("--subset-only", action="store_true", help="keep parts 1-2 from file")
    parser.add_argument("--checkpoint", default=None, help="a subset inverter (end to end)")
    parser.add_argument("--test", default="runs/steps/test", help="test store (end to end)")
    parser.add_argument("--e2e-prompts", type=int, default=200)
    parser.add_argument("--skip-probe", action="store_true", help="part 3 rows only")
    args = parser.parse_args()
    white = load_target(DEFAULT_TARGET, mode="user")
    out = RESULTS / "api_recovery.json"
    if args.subset_only:
        previous = json.loads(out.read_text())
        part = subset_part(args, white)
        print_subset(part)
        previous["subset"] = {**previous.get("subset", {}), **part}
        command = previous.pop("command")
        command = command.split() if isinstance(command, str) else command
        previous["machine_parts_1_2"] = previous.pop("machine", None)
        # Part 3 may be run in pieces (--skip-probe keeps the probe and the end-to-end row).
        runs = previous.pop("subset_commands", [])
        old = previous.pop("subset_command", None)
        previous["subset_commands"] = [*([old] if old else []), *runs, ["python", *sys.argv]]
        write_results(out, previous, command=command)
        print(f"wrote {out}")
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, flags, full in SETTINGS:
            if args.only and label not in args.only:
                continue
            print(f"== {label}", flush=True)
            results.append(run_setting(label, flags, full, args, white, tmp))
        llama = run_llamacpp(args, white, tmp) if args.llamacpp_python else None

    print(
        f"\n{'setting':24} {'strategy':10} {'k':>3} {'queries/dist':>12} {'s/query':>8} "
        f"{'min/dist':>8} {'max|err|':>9} {'KL':>9} {'unres.':>6}"
    )
    for r in results:
        minutes = r["seconds_per_distribution"]
        print(
            f"{r['setting']:24} {r['strategy']:10} {r['top_k']:3d} "
            f"{fmt(r['queries_per_distribution'], ',d'):>12} {r['seconds_per_query']:8.4f} "
            f"{fmt(minutes / 60 if minutes else None, '.1f'):>8} {r['max_abs_err']:9.2e} "
            f"{fmt(r['kl'], '.2e'):>9} {r['unresolved']:6d}"
            + ("" if r["full"] else "  (sampled entries)")
        )
    if llama:
        print(
            f"\nllama-cpp-python server: strategy {llama['strategy']}, "
            f"{llama['queries_per_distribution']:,} queries/distribution, "
            f"{llama['seconds_per_query']:.4f} s/query; max |recovered - reported top-20| "
            f"{llama['max_abs_err_vs_reported']:.2e}; median |recovered - transformers| "
            f"{llama['median_abs_diff_vs_transformers']:.3f}; unresolved {llama['unresolved']}"
        )
    part = subset_part(args, white) if args.subset else None
    if part:
        print_subset(part)
    write_results(
        out,
        {
            "vocab": white.vocab_size,
            "bisection_steps": math.ceil(math.log2(100 / 1e-3)),
            "settings": results,
            "llamacpp": llama,
            **({"subset": part} if part else {}),
        },
        command=["python", *sys.argv],
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
