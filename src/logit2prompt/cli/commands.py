"""The subcommands: each turns parsed flags into a call of the library (and prints a summary;
the library itself logs). `invert` lives in main.py."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from ..data.corpus import resolve_corpus
from ..errors import CorpusError, Logit2PromptError, TargetError
from .args import config_from_args

if TYPE_CHECKING:  # annotations only: each command imports what it runs when it runs
    from ..defenses.sweep import SweepConfig
    from ..evaluation.evaluate import EvalConfig
    from ..recipes.quickstart import QuickstartConfig
    from ..training.config import TrainConfig


def white_box_basis(name: str):
    """The output-layer basis of a white-box target (`--basis-from`), loaded in fp32."""
    from ..targets import load_target

    basis = load_target(name, mode="raw", dtype="float32").output_basis()
    if basis is None:
        raise TargetError(f"{name!r} exposes no output-layer basis")
    return basis


def load_cli_target(args, device: str | None = None):
    """The target of the shared target flags: a local model, or an API endpoint (probed)."""
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
            user_turn=getattr(args, "user_turn", None),
            strategy=args.api_strategy,
            top_k=args.api_top_k,
            concurrency=args.api_concurrency,
            rate_limit=args.api_rate_limit,
            cache_path=args.api_cache,
            max_queries=args.api_max_queries,
            progress=not getattr(args, "no_progress", False),
        )
        strategy, k = target.probe()
        cost = target.query_cost(strategy, k)
        if getattr(args, "basis_from", None):
            from ..targets.subset import TokenSubset, default_subset_size

            basis = white_box_basis(args.basis_from)
            size = getattr(args, "subset_size", None) or default_subset_size(basis.width)
            seed = getattr(args, "subset_seed", 0)
            subset = TokenSubset.choose(target.tokenizer, target.vocab_size, size, seed)
            target.use_basis(basis, subset)
            cost = target.query_cost(strategy, k, subset.size + len(target.check_ids))
        print(
            f"API target {target.base_url} ({target.model}): strategy {strategy}, top-{k}, "
            f"{cost} queries per distribution",
            file=sys.stderr,
        )
        return target
    api_only = [
        flag
        for flag, on in (
            ("--tokenizer", getattr(args, "tokenizer", None)),
            ("--api-strategy", getattr(args, "api_strategy", "auto") != "auto"),
            ("--api-top-k", getattr(args, "api_top_k", None)),
            ("--api-rate-limit", getattr(args, "api_rate_limit", None)),
            ("--api-cache", getattr(args, "api_cache", None)),
            ("--api-max-queries", getattr(args, "api_max_queries", None)),
            ("--basis-from", getattr(args, "basis_from", None) and args.command == "collect"),
        )
        if on
    ]
    if api_only:
        raise TargetError(
            f"{', '.join(api_only)}: for API targets (--target openai:BASE_URL:MODEL) only; "
            f"{args.target} is a local model"
        )
    return load_target(
        args.target,
        mode=args.mode,
        dtype=args.dtype,  # fp32/bf16/fp16: load_target reads the short names
        device=device or args.device,
        system_prompt=args.system_prompt,
        batch_size=args.batch_size,
        user_turn=getattr(args, "user_turn", None),
    )


def load_cli_corpus(args, target):
    """The prompts of the shared corpus flags, their length counted in the target's tokens."""
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
    from ..data.corpus import clean, read_rows

    if args.name == "bigbench":
        from ..data.bigbench import build_bigbench_corpus

        path = build_bigbench_corpus(args.out, force=args.force)
    else:
        path = _build_mix(args)
    corpus = clean(read_rows(str(path)), str(path), max_tokens=None)
    print(f"{args.name} corpus: {path}")
    print(f"  {len(corpus)} prompts; splits: {corpus.split_counts()}")
    if args.name == "mix":
        from ..data.mix import manifest_path

        manifest = json.loads(manifest_path(path).read_text())
        for src in manifest["sources"]:
            origin = f"{src['package']} {src['version']}" if src["package"] else "no package"
            print(
                f"  {src['name']:14} {src['kept']:>6} of {src['read']:>6} "
                f"({src['licence']}; {origin})"
            )
        for name, why in manifest.get("unavailable", {}).items():
            print(f"  {name:14} left out: {why}")
        print(f"  manifest: {manifest_path(path)}")


def _build_mix(args):
    from ..data.mix import DEFAULT_SOURCES, build_mix

    caps = {}
    for item in args.cap:
        name, sep, value = item.partition("=")
        if not sep or not value.isdigit():
            raise CorpusError(f"--cap takes SOURCE=N, got {item!r}")
        caps[name] = int(value)
    extra, extra_meta = {}, {}
    if args.target_samples > 0:
        from ..data.sampled import SamplingConfig, sample_target_prompts
        from ..targets import load_target

        target = load_target(args.target)
        config = SamplingConfig(
            kind=args.sample_kind,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.sample_seed,
        )
        name = f"sampled-{config.kind}"
        extra[name] = sample_target_prompts(target, args.target_samples, config)
        extra_meta[name] = {
            "target": target.fingerprint.to_dict(),
            "sampling": asdict(config),
            "samples": args.target_samples,
            "licence": "the target's licence (samples of its own chat prior)",
        }
    return build_mix(
        args.out,
        sources=[s for s in args.sources.split(",") if s] if args.sources else DEFAULT_SOURCES,
        skip_unavailable=args.sources is None,
        caps=caps,
        exclude=args.exclude,
        exclude_field=args.exclude_field,
        threshold=args.exclude_threshold,
        extra=extra,
        extra_meta=extra_meta,
        force=args.force,
    )


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
        fmt=args.format,
        subset_size=args.subset_size,
        subset_seed=args.subset_seed,
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
            f"stored {result.num_prompts} prompts in {result.path} [{result.encoding}] "
            f"({result.shards_written} shards written, {result.shards_skipped} resumed, "
            f"{result.dropped_over_context} over the target's context; "
            f"{result.prompts_per_second:.1f} prompts/s on process 0)"
        )


def _parse_overrides(items: list[str]) -> dict:
    """`--set KEY=VALUE` pairs; a VALUE that reads as JSON is taken as such (numbers, lists)."""
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


def train_config(args) -> TrainConfig:
    from ..training.config import TrainConfig

    overrides = _parse_overrides(args.set)
    return config_from_args(TrainConfig, args, overrides=overrides, progress=not args.no_progress)


def cmd_train(args) -> None:
    from ..training.trainer import Trainer, latest_checkpoint

    cfg = train_config(args)
    last = latest_checkpoint(cfg.out)
    if last is not None and not args.resume:
        # A fresh run there would prune its own first checkpoints as older than that run's,
        # and a later --resume would load the earlier run's.
        raise Logit2PromptError(
            f"{cfg.out} holds checkpoints of an earlier run (latest: {last.name}); --resume "
            f"continues it; to start over, train into another --out or delete {last.parent}"
        )
    trainer = Trainer(cfg)
    if trainer.accelerator.is_main_process:
        c = trainer.model.config
        if c.decoder != "causal":
            shape = f"{c.seq_len} chunks of {c.chunk_width}, d_model {c.d_model}"
        elif not c.pseudo_tokens:
            shape = f"the {c.steps}-token greedy reply as text (text-only) -> {c.decoder_init}"
        else:
            shape = (
                f"{c.subspace_dim} subspace coordinates -> {c.tokens_per_step * c.steps}-token "
                f"prefix ({c.tokens_per_step} per step"
                + (", and each step's greedy token" if c.reply_tokens else "")
                + f") of {c.decoder_init}"
            )
        print(
            f"training on {len(trainer.train_idx)} prompts from {cfg.data} "
            f"({trainer.store.fingerprint.describe()}); inverter: {shape}, "
            f"{sum(p.numel() for p in trainer.model.parameters()) / 1e6:.1f}M parameters"
        )
    trainer.run(resume=args.resume)
    if trainer.accelerator.is_main_process:
        print(f"saved inverter to {cfg.out}")


def cmd_demo(args) -> None:
    from ..recipes.demo import DemoConfig, format_demo, run_demo

    print(format_demo(run_demo(config_from_args(DemoConfig, args, progress=not args.no_progress))))


def cmd_adapt(args) -> None:
    from ..recipes.adapt import AdaptConfig, adapt

    path = adapt(config_from_args(AdaptConfig, args, progress=not args.no_progress))
    print(f"adapted inverter: {path}\n  logit2prompt invert --checkpoint {path} --text ...")


def quickstart_config(args) -> QuickstartConfig:
    from ..recipes.quickstart import QuickstartConfig

    return config_from_args(QuickstartConfig, args, progress=not args.no_progress)


def cmd_quickstart(args) -> None:
    from ..recipes.quickstart import format_report, run_quickstart

    print(format_report(run_quickstart(quickstart_config(args))))


def sweep_config(args) -> SweepConfig:
    from ..defenses.sweep import DEFAULT_SPECS, SweepConfig

    # `--defenses ''` has always meant the default grid, as leaving the flag out does
    return config_from_args(SweepConfig, args, specs=args.specs or DEFAULT_SPECS)


def cmd_defend_sweep(args) -> None:
    from ..defenses.sweep import best_tradeoff, run_sweep

    cfg = sweep_config(args)
    results = run_sweep(cfg, progress=not args.no_progress)
    best = best_tradeoff(results["rows"])
    print(f"wrote {cfg.out}/results.json, leakage_vs_utility.png and report.html")
    if best:
        print(f"most leakage removed per unit of utility cost: {best['spec']}")


def eval_config(args) -> EvalConfig:
    from ..evaluation.evaluate import EvalConfig

    # the shared --split says "all" where EvalConfig says None
    split = None if args.split == "all" else args.split
    return config_from_args(EvalConfig, args, split=split, progress=not args.no_progress)


def cmd_evaluate(args) -> None:
    from ..evaluation.evaluate import evaluate
    from ..evaluation.metrics import format_table

    cfg = eval_config(args)
    results = evaluate(cfg)
    print(format_table(results["summary"]))
    print(f"wrote {cfg.out}/results.json, predictions.jsonl and report.html")


def cmd_train_text(args) -> None:
    from ..training.text import build_text_inverter

    build_text_inverter(
        args.data,
        args.out,
        like=args.like,
        steps=args.max_steps,
        limit=args.limit,
        progress=not args.no_progress,
    )
    print(f"wrote {args.out}")


def cmd_probe_api(args) -> None:
    from ..targets.api.probe import format_probe, probe_endpoint

    if not args.target.startswith("openai:"):
        raise TargetError("probe-api reads an endpoint: --target openai:BASE_URL:MODEL")
    target = load_cli_target(args)
    sizes = {"prompts": args.probe_prompts, "tokens": args.probe_tokens}
    sizes = {k: v for k, v in sizes.items() if v is not None}
    report = probe_endpoint(target, seed=args.seed, plot=args.plot, **sizes)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(format_probe(report))


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
        leak_filter=args.leak_filter,
    )
    if args.target.startswith("openai:"):
        raise Logit2PromptError(
            f"serve runs a local model; {args.target} is an endpoint already (point the "
            "attack at it with --target there)"
        )
    args.mode = "raw"  # the server renders chat itself; the target's mode is unused
    target = load_cli_target(args)
    from ..server.app import startup_info

    print(json.dumps(startup_info(config, args.host, args.port)), flush=True)
    serve(target, config, host=args.host, port=args.port)


def cmd_export(args) -> None:
    import torch

    from ..data.store import DistributionStore
    from ..models.checkpoint import TRAINING_ARGS_NAME
    from ..models.inverter import Inverter

    source = Path(args.checkpoint)
    model = Inverter.from_pretrained(source)
    if args.memory_data:
        _attach_memory(model, args.memory_data)
    training_args = None
    if (source / TRAINING_ARGS_NAME).is_file():
        training_args = json.loads((source / TRAINING_ARGS_NAME).read_text())
    model.save_pretrained(args.out, training_args, slim=True, dtype=args.dtype)
    out = Path(args.out)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"slim checkpoint: {out} ({size / 1e6:.1f} MB, weights in {args.dtype})")
    if args.verify_data:
        store = DistributionStore(args.verify_data)
        idx = list(range(min(args.verify_limit, len(store))))
        x = torch.from_numpy(store.observations(idx, model.config.steps, model.token_subset))
        slim = Inverter.from_pretrained(out)
        same = sum(a == b for a, b in zip(model.invert(x), slim.invert(x), strict=True))
        print(f"  greedy predictions identical to the original on {same} of {len(idx)} prompts")


def _attach_memory(model, data: str) -> None:
    """Give an inverter without neighbours a memory of `data`'s prompts, so that the
    nearest-neighbour baseline and the re-ranker run wherever it goes (the inverter itself
    does not read it)."""
    from ..data.store import DistributionStore
    from ..errors import CheckpointError, StoreError
    from ..models.retrieval import NeighbourMemory

    if model.config.neighbours:
        raise CheckpointError(
            "--memory-data: this inverter is retrieval-augmented; its memory is the one it "
            "was trained with"
        )
    store = DistributionStore(data)
    diffs = model.fingerprint.reading_differences(store.fingerprint)
    if diffs:
        raise StoreError(f"--memory-data comes from another target: {'; '.join(diffs)}")
    if model.token_subset is not None or store.steps < model.config.steps:
        raise StoreError(
            f"--memory-data needs whole vectors of at least {model.config.steps} steps; "
            f"{data} holds {store.steps}"
        )
    model.set_memory(
        NeighbourMemory.from_store(
            store, model.config.dim, steps=model.config.steps, dims=model.config.neighbour_dims
        )
    )


def cmd_merge(args) -> None:
    from ..data.store import DistributionStore, merge_stores

    out = merge_stores(args.out, args.stores)
    print(f"merged {len(args.stores)} stores into {out} ({len(DistributionStore(out))} prompts)")


def cmd_filter(args) -> None:
    from ..data.corpus import normalise, read_rows
    from ..data.store import filter_store, read_manifest

    wanted = {s for s in (args.sources or "").split(",") if s}
    keep = {
        normalise(row[args.field])
        for row in read_rows(args.keep, args.field)
        if isinstance(row.get(args.field), str) and (not wanted or row.get("source") in wanted)
    }
    out = filter_store(args.out, args.store, lambda p: normalise(p) in keep)
    corpus = read_manifest(out)["corpus"]
    print(f"kept {corpus['kept']} of {corpus['of']} prompts of {args.store} in {out}")


def cmd_hypotheses(args) -> None:
    from ..models.inverter import Inverter, native_bf16
    from ..training.corrector import write_hypotheses

    model = Inverter.from_pretrained(args.checkpoint)
    out = write_hypotheses(
        model,
        args.data,
        args.out,
        samples=args.samples,
        memory=args.memory,
        keep=args.keep,
        seed=args.seed,
        batch_size=args.batch_size,
        bf16=native_bf16(),
        progress=not args.no_progress,
    )
    print(f"neighbour texts of {args.data} in {out} (train with --neighbour-texts {out})")


def cmd_info(args) -> None:
    from ..data.store import bytes_per_step, describe_encoding, read_manifest
    from ..models.checkpoint import CONFIG_NAME, FINGERPRINT_NAME, TRAINING_ARGS_NAME, is_checkpoint
    from ..models.retrieval import MEMORY_PROMPTS

    path = Path(args.path)
    if not is_checkpoint(path):
        manifest = read_manifest(path)
        per_step = bytes_per_step(manifest)
        manifest["summary"] = {
            "format": describe_encoding(manifest["encoding"]),
            "bytes_per_prompt_step": per_step,
            "bytes_per_prompt": per_step * int(manifest["steps"]),
            "fp16_full_bytes_per_prompt_step": int(manifest["vocab_size"]) * 2,
        }
        print(json.dumps(manifest, indent=1))
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
