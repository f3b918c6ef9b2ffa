"""The `logit2prompt` command line: one subcommand per step of the data flow."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..attacks.rerank import DEFAULT_CONFIDENCE_NATS
from ..data.corpus import BUILTIN_CORPORA, DEFAULT_FIELD, DEFAULT_MAX_TOKENS, SPLITS, resolve_corpus
from ..data.store import DEFAULT_SHARD_SIZE, DEFAULT_STORE_DTYPE, STORE_DTYPES
from ..errors import Logit2PromptError
from ..targets import DEFAULT_TARGET, PROMPT_MODES

# Vectors per call of --rerank-with / --fallback-to: each call reads the whole store once.
RERANK_CHUNK = 512


def add_target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target",
        default=DEFAULT_TARGET,
        help="built-in name, local directory, .gguf file or hub id (default: %(default)s)",
    )
    p.add_argument(
        "--mode",
        choices=PROMPT_MODES,
        default="user",
        help="raw text, the chat user turn, or the chat system turn (default: %(default)s)",
    )
    p.add_argument(
        "--system-prompt",
        default=None,
        help="system message in user mode (default: the template's own)",
    )
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "fp16"],
        default="fp32",
        help="target weights dtype (default: %(default)s)",
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if present)")
    p.add_argument("--batch-size", type=int, default=32)
    api = p.add_argument_group("API targets (--target openai:BASE_URL:MODEL)")
    api.add_argument("--tokenizer", default=None, help="the endpoint's tokenizer (dir or hub id)")
    api.add_argument(
        "--api-key-env", default="OPENAI_API_KEY", help="environment variable with the API key"
    )
    api.add_argument(
        "--api-strategy",
        choices=["auto", "bias-block", "force", "gap"],
        default="auto",
        help="recovery strategy (default: probe the endpoint and pick)",
    )
    api.add_argument("--api-top-k", type=int, default=None, help="top log-probs to ask for")
    api.add_argument("--api-concurrency", type=int, default=8)
    api.add_argument("--api-rate-limit", type=float, default=None, help="requests per second")


def add_corpus_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--prompts",
        required=required,
        help="corpus file (.jsonl/.json/.csv/.txt/.parquet), hf:NAME[:CONFIG[:SPLIT]], "
        "or 'bigbench' for the default corpus",
    )
    p.add_argument("--field", default=DEFAULT_FIELD, help="text field (default: %(default)s)")
    p.add_argument("--split", choices=(*SPLITS, "all"), default="all")
    p.add_argument("--limit", type=int, default=None, help="keep the first N prompts")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        help="drop prompts longer than this many target tokens (default: %(default)s)",
    )


def load_cli_target(args, device: str | None = None):
    from ..targets import load_target

    if args.target.startswith("openai:"):
        import os

        from ..targets.api.target import resolve_api_target

        target = resolve_api_target(
            args.target,
            tokenizer=args.tokenizer,
            api_key=os.environ.get(args.api_key_env),
            mode=args.mode,
            system_prompt=args.system_prompt,
            strategy=args.api_strategy,
            top_k=args.api_top_k,
            concurrency=args.api_concurrency,
            rate_limit=args.api_rate_limit,
            progress=not getattr(args, "no_progress", False),
        )
        strategy, k = target.probe()
        print(
            f"API target {target.base_url} ({target.model}): strategy {strategy}, top-{k}, "
            f"{target.query_cost(strategy, k)} queries per distribution",
            file=sys.stderr,
        )
        return target
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[args.dtype]
    return load_target(
        args.target,
        mode=args.mode,
        dtype=dtype,
        device=device or args.device,
        system_prompt=args.system_prompt,
        batch_size=args.batch_size,
    )


def load_cli_corpus(args, target):
    from ..data.corpus import load_corpus

    return load_corpus(
        resolve_corpus(args.prompts),
        field_name=args.field,
        count_tokens=target.count_tokens,
        max_tokens=args.max_tokens,
        split=args.split,
        limit=args.limit,
    )


# ----------------------------------------------------------------------------- commands
def cmd_data(args) -> None:
    from ..data.bigbench import build_bigbench_corpus
    from ..data.corpus import clean, read_rows

    path = build_bigbench_corpus(args.out, force=args.force)
    corpus = clean(read_rows(str(path)), str(path), max_tokens=None)
    print(f"default corpus: {path}")
    print(f"  {len(corpus)} prompts; splits: {corpus.split_counts()}")


def cmd_collect(args) -> None:
    from ..data.collect import collect
    from ..defenses.chain import parse_defense
    from ..distributed import partial_state
    from ..targets.defended import DefendedTarget

    state = partial_state()
    device = str(state.device) if state.num_processes > 1 else None
    target = load_cli_target(args, device=device)
    chain = parse_defense(args.defense)
    if chain:
        target = DefendedTarget(target, chain)
    corpus = load_cli_corpus(args, target)
    if state.is_main_process:
        print(f"target: {target.fingerprint.describe()}")
        print(
            f"corpus: {corpus.source}: {len(corpus)} prompts (split {args.split}); "
            f"dropped {corpus.dropped}"
        )
    result = collect(
        target,
        corpus,
        args.out,
        split=args.split,
        steps=args.steps,
        store_dtype=args.store_dtype,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        process_index=state.process_index,
        num_processes=state.num_processes,
        wait_for_everyone=state.wait_for_everyone,
        progress=not args.no_progress,
    )
    if state.is_main_process:
        print(
            f"stored {result.num_prompts} prompts in {result.path} "
            f"({result.shards_written} shards written, {result.shards_skipped} resumed, "
            f"{result.dropped_over_context} over the target's context; "
            f"{result.prompts_per_second:.1f} prompts/s on process 0)"
        )


def _train_config_args(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, generated from the dataclass (configs as data)."""
    from dataclasses import MISSING, fields

    from ..training.trainer import TrainConfig

    skip = {"data", "out", "overrides", "progress"}
    for f in fields(TrainConfig):
        if f.name in skip:
            continue
        default = f.default if f.default is not MISSING else None
        kind = type(default) if default is not None else str
        if kind is bool:
            kind = _flag_value
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            type=kind,
            default=default,
            help=f"(default: {default})",
        )


def _flag_value(text: str) -> bool:
    """`--neighbour-copy false` and the like: argparse's bool() would take any text as True."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def cmd_train(args) -> None:
    from dataclasses import fields

    from ..training.trainer import TrainConfig, Trainer

    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    cfg = TrainConfig(
        **{**values, "overrides": _parse_overrides(args.set), "progress": not args.no_progress}
    )
    trainer = Trainer(cfg)
    if trainer.accelerator.is_main_process:
        c = trainer.model.config
        shape = (
            f"{c.subspace_dim} subspace coordinates -> {c.prefix_length}-token prefix of "
            f"{c.decoder_init}"
            if c.decoder == "causal"
            else f"{c.seq_len} chunks of {c.chunk_width}, d_model {c.d_model}"
        )
        print(
            f"training on {len(trainer.train_idx)} prompts from {cfg.data} "
            f"({trainer.store.fingerprint.describe()}); inverter: {shape}, "
            f"{sum(p.numel() for p in trainer.model.parameters()) / 1e6:.1f}M parameters"
        )
    trainer.run(resume=args.resume)
    if trainer.accelerator.is_main_process:
        print(f"saved inverter to {cfg.out}")


def cmd_invert(args) -> None:
    from ..attacks.invert import invert_store, load_vectors, target_for, write_predictions
    from ..models.inverter import Inverter

    if args.confidence_nats != DEFAULT_CONFIDENCE_NATS and not args.fallback_to:
        raise Logit2PromptError("--confidence-nats is the threshold of --fallback-to; add it")
    inverter = Inverter.from_pretrained(args.checkpoint, device=args.device)
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
    if args.rerank_with or args.fallback_to:
        (run, target), chunk = _with_store(args, inverter), RERANK_CHUNK
    else:
        run, chunk = (lambda v: inverter.invert(v, **generate)), args.batch_size
    references = None
    if args.text is not None:
        target = target or target_for(inverter, device=args.device)
        predictions = run(target.next_token_logprobs([args.text], steps=_steps(inverter)))
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
            predictions.extend(run(target.next_token_logprobs(texts, steps=_steps(inverter))))
    else:
        from ..data.store import DistributionStore

        store = DistributionStore(args.data)
        references = store.prompts
        predictions = invert_store(
            inverter, store, batch_size=chunk, progress=not args.no_progress, invert=run
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


def _with_store(args, inverter):
    """`--rerank-with STORE` or `--fallback-to STORE`: a function from vectors to one prompt
    each, chosen between the inverter's output and the STORE's nearest prompts, and the target
    (None for `--fallback-to`, which never queries it). Bad arguments and a foreign store are
    refused before anything is loaded."""
    import torch

    from ..attacks.invert import ensure_same_target, target_for
    from ..attacks.rerank import DEFAULT_NEIGHBOURS, confident_or_nearest, inverter_with_neighbours
    from ..data.store import DistributionStore

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
    shape = (inverter.config.steps, inverter.config.vocab_size)
    decoding = {
        "no_repeat_ngram_size": args.no_repeat_ngram_size,
        "batch_size": args.batch_size,
        "bf16": args.bf16,
    }
    if args.fallback_to:

        def fallback(vectors) -> list[str]:
            observed = inverter.as_batch(vectors).reshape(-1, *shape).numpy()
            top = inverter.invert(torch.from_numpy(observed), num_beams=args.num_beams, **decoding)
            answers, _ = confident_or_nearest(
                inverter,
                train,
                observed,
                top,
                args.confidence_nats,
                batch_size=args.batch_size,
                progress=False,
            )
            return answers

        return fallback, None
    target = target_for(inverter, device=args.device, batch_size=args.batch_size)

    def rerank(vectors) -> list[str]:
        observed = inverter.as_batch(vectors).reshape(-1, *shape).numpy()
        return inverter_with_neighbours(
            inverter,
            target,
            train,
            observed,
            beams=args.num_beams,
            neighbours=DEFAULT_NEIGHBOURS,
            **decoding,
        )

    return rerank, target


def _steps(inverter) -> int | None:
    return inverter.config.steps if inverter.config.steps > 1 else None


def cmd_quickstart(args) -> None:
    from ..recipes.quickstart import QuickstartConfig, run_quickstart

    run_quickstart(
        QuickstartConfig(
            out=args.out,
            scale=args.scale,
            dtype=args.dtype,
            progress=not args.no_progress,
            corpus=args.prompts,
            preset=args.preset,
            neighbours=args.neighbours,
        )
    )


def cmd_defend_sweep(args) -> None:
    from ..defenses.sweep import DEFAULT_SPECS, SweepConfig, best_tradeoff, run_sweep

    specs = (
        tuple(x.strip() for x in args.defenses.split(";") if x.strip())
        if args.defenses
        else DEFAULT_SPECS
    )
    results = run_sweep(
        SweepConfig(
            checkpoint=args.checkpoint,
            train_data=args.train_data,
            test_data=args.test_data,
            out=args.out,
            specs=specs,
            finetune_steps=args.finetune_steps,
            finetune_lr=args.finetune_lr,
            test_limit=args.limit,
        ),
        progress=not args.no_progress,
    )
    best = best_tradeoff(results["rows"])
    print(f"wrote {args.out}/results.json, leakage_vs_utility.png and report.html")
    if best:
        print(f"most leakage removed per unit of utility cost: {best['spec']}")


def cmd_evaluate(args) -> None:
    from ..evaluation.evaluate import EvalConfig, evaluate
    from ..evaluation.metrics import format_table

    baselines = tuple(b.strip() for b in args.baselines.split(",") if b.strip())
    results = evaluate(
        EvalConfig(
            checkpoint=args.checkpoint,
            prompts=args.prompts,
            out=args.out,
            baselines=baselines,
            train_data=args.train_data,
            field=args.field,
            split=None if args.split == "all" else args.split,
            limit=args.limit,
            sample=args.sample,
            num_beams=args.num_beams,
            no_repeat_ngram_size=args.no_repeat_ngram_size,
            attacks=args.attacks,
            text_checkpoint=args.text_checkpoint,
            rerank=args.rerank,
            refine_rounds=args.refine_rounds,
            predictions=tuple(args.predictions),
            semantic=not args.no_semantic,
            functional=not args.no_functional,
            batch_size=args.batch_size,
            progress=not args.no_progress,
        )
    )
    print(format_table(results["summary"]))
    print(f"wrote {args.out}/results.json, predictions.jsonl and report.html")


def cmd_train_text(args) -> None:
    from ..models.text_inverter import build_text_inverter

    build_text_inverter(
        args.data,
        args.out,
        like=args.like,
        steps=args.steps,
        limit=args.limit,
        progress=not args.no_progress,
    )
    print(f"wrote {args.out}")


def cmd_serve(args) -> None:
    from ..server.app import ServerConfig, serve
    from ..targets import DEFAULT_TARGET

    api_key = args.api_key
    if api_key is None and args.api_key_env:
        import os

        api_key = os.environ.get(args.api_key_env) or None
    config = ServerConfig(
        model_name=args.model_name
        or (DEFAULT_TARGET if args.target == DEFAULT_TARGET else args.target),
        max_top_logprobs=args.max_top_logprobs,
        logprobs_mode=args.logprobs_mode,
        defense=args.defense or "",
        api_key=api_key,
        max_tokens_limit=args.max_tokens_limit,
        max_in_flight=args.max_in_flight,
    )
    args.mode = "raw"  # the server renders chat itself; the target's mode is unused
    serve(load_cli_target(args), config, host=args.host, port=args.port)


def cmd_info(args) -> None:
    from ..data.store import read_manifest
    from ..models.inverter import CONFIG_NAME, FINGERPRINT_NAME, TRAINING_ARGS_NAME
    from ..models.retrieval import MEMORY_PROMPTS

    path = Path(args.path)
    if not (path / CONFIG_NAME).is_file():
        print(json.dumps(read_manifest(path), indent=1))
        return
    # An inverter checkpoint: its config, target and how training ended (no weights loaded).
    info = {"checkpoint": str(path), "config": json.loads((path / CONFIG_NAME).read_text())}
    for name, key in ((FINGERPRINT_NAME, "target"), (TRAINING_ARGS_NAME, "training")):
        if (path / name).is_file():
            info[key] = json.loads((path / name).read_text())
    history = info.get("training", {}).pop("history", [])
    if history:
        info["last_validation"] = history[-1]
    memory = path / MEMORY_PROMPTS
    if memory.is_file():
        info["neighbour_memory_prompts"] = len(json.loads(memory.read_text(encoding="utf-8")))
    print(json.dumps(info, indent=1))


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="logit2prompt", description="Recover hidden prompts from next-token distributions."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="build the default BIG-bench corpus (cached)")
    p.add_argument("name", choices=BUILTIN_CORPORA)
    p.add_argument("--out", default=None, help="where to write the JSONL (default: cache)")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("collect", help="collect a target's distributions into a store")
    add_target_args(p)
    add_corpus_args(p)
    p.add_argument("--out", required=True, help="store directory (rerun to resume)")
    p.add_argument("--steps", type=int, default=1, help="generation steps per prompt")
    p.add_argument("--store-dtype", choices=sorted(STORE_DTYPES), default=DEFAULT_STORE_DTYPE)
    p.add_argument(
        "--defense",
        default=None,
        help='defense applied before storing, e.g. "topk:20,noise:gauss:0.5"',
    )
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("train", help="train an inverter on a store (works under accelerate launch)")
    p.add_argument("--data", required=True, help="training store")
    p.add_argument("--out", required=True, help="output directory (checkpoints, logs, final)")
    _train_config_args(p)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override an InverterConfig field, e.g. --set d_model=512",
    )
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("invert", help="recover prompts with a trained inverter")
    p.add_argument("--checkpoint", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="a prompt: run the target on it, then invert (demo)")
    src.add_argument("--vectors", help=".npy or .safetensors log-prob vectors")
    src.add_argument("--prompts", help="corpus file: run the target on each prompt, invert all")
    src.add_argument("--data", help="a distribution store")
    p.add_argument("--field", default=DEFAULT_FIELD)
    p.add_argument("--split", choices=(*SPLITS, "all"), default="all")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--out", help="write predictions as JSONL")
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--num-return-sequences", type=int, default=1)
    p.add_argument("--sample", action="store_true", help="sample instead of beam search")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument(
        "--no-repeat-ngram-size",
        type=int,
        default=0,
        help="forbid repeating any n-gram of this size (0: off)",
    )
    p.add_argument(
        "--bf16",
        action="store_true",
        help="decode under bf16 autocast (1.6-1.8x faster on a CPU; see decode_precision.py)",
    )
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
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_invert)

    p = sub.add_parser("quickstart", help="corpus -> collect -> train -> evaluate, on the default")
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply corpus size and training steps (default: %(default)s)",
    )
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    p.add_argument(
        "--prompts", default=None, help="a corpus file (default: BIG-bench, built on first use)"
    )
    p.add_argument("--preset", default="prefix-lm", help="inverter preset (default: %(default)s)")
    p.add_argument(
        "--neighbours", type=int, default=2, help="nearest training prompts the inverter reads"
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("defend-sweep", help="leakage vs utility cost for each defense")
    p.add_argument("--checkpoint", required=True, help="an inverter trained on clean data")
    p.add_argument("--train-data", required=True, help="clean training store (adaptive attacker)")
    p.add_argument("--test-data", required=True, help="clean test store")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--defenses", default=None, help='specs separated by ";" (default: a grid of every defense)'
    )
    p.add_argument("--finetune-steps", type=int, default=60)
    p.add_argument("--finetune-lr", type=float, default=3e-4)
    p.add_argument("--limit", type=int, default=128, help="test prompts scored")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_defend_sweep)

    p = sub.add_parser("evaluate", help="score the inverter and baselines; JSON + HTML report")
    p.add_argument("--checkpoint", required=True)
    p.add_argument(
        "--prompts", required=True, help="corpus file (any format collect reads) or 'bigbench'"
    )
    p.add_argument("--out", required=True)
    p.add_argument(
        "--baselines",
        default="nn,constant",
        help="comma-separated: nn, constant, extraction, fewshot, or '' (default: %(default)s)",
    )
    p.add_argument("--train-data", default=None, help="training store (nn, constant, fewshot)")
    p.add_argument("--field", default=DEFAULT_FIELD)
    p.add_argument("--split", choices=(*SPLITS, "all"), default="all")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--sample", type=int, default=None, help="a seeded random N of the prompts")
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--no-repeat-ngram-size", type=int, default=0)
    p.add_argument("--attacks", default=None, help="JSON file of extraction attack strings")
    p.add_argument("--text-checkpoint", default=None, help="text-only inverter (baseline text)")
    p.add_argument(
        "--predictions",
        nargs="*",
        default=[],
        help="JSONL files of other methods' predictions ({hidden, recovered}) to score alike",
    )
    p.add_argument(
        "--rerank",
        action="store_true",
        help="also score inverter beams + nearest neighbours re-ranked by the target",
    )
    p.add_argument(
        "--refine-rounds",
        type=int,
        default=0,
        help="also score the nearest neighbour refined by the target: N rounds of single-token "
        "edits proposed by the inverter, each kept if it brings the target's distribution closer",
    )
    p.add_argument("--no-semantic", action="store_true", help="skip the MiniLM cosine")
    p.add_argument("--no-functional", action="store_true", help="skip KL / top-1 agreement")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "train-text", help="train the text-only inversion baseline on a store's prompts"
    )
    p.add_argument("--data", required=True, help="training store (its prompts and target)")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--like",
        required=True,
        help="a log-prob inverter checkpoint: same preset, batch size, lr and steps",
    )
    p.add_argument("--steps", type=int, default=None, help="override the number of steps")
    p.add_argument("--limit", type=int, default=None, help="use the first N training prompts")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train_text)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server for a local target")
    p.add_argument(
        "--target", default=DEFAULT_TARGET, help="built-in name, directory, .gguf, hub id"
    )
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--device", default=None)
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
    p.set_defaults(func=cmd_serve, system_prompt=None, batch_size=1)

    p = sub.add_parser("info", help="print a store's manifest or an inverter checkpoint's summary")
    p.add_argument("path", help="a distribution store or an inverter checkpoint directory")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
