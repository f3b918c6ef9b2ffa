"""The `logit2prompt` command line: one subcommand per step of the data flow."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import Logit2PromptError
from .prompts import DEFAULT_FIELD, DEFAULT_MAX_TOKENS, SPLITS
from .store import DEFAULT_SHARD_SIZE, DEFAULT_STORE_DTYPE, STORE_DTYPES
from .targets import DEFAULT_TARGET, PROMPT_MODES

BUILTIN_CORPORA = ("bigbench",)


def resolve_corpus(name: str) -> str:
    """A built-in corpus name ('bigbench') becomes its cached file; paths pass through."""
    if name == "bigbench":
        from .bigbench import build_bigbench_corpus

        return str(build_bigbench_corpus())
    return name


def add_target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=DEFAULT_TARGET,
                   help="built-in name, local directory, .gguf file or hub id (default: %(default)s)")
    p.add_argument("--mode", choices=PROMPT_MODES, default="user",
                   help="raw text, the chat user turn, or the chat system turn (default: %(default)s)")
    p.add_argument("--system-prompt", default=None,
                   help="system message in user mode (default: the template's own)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="target weights dtype (default: %(default)s)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if present)")
    p.add_argument("--batch-size", type=int, default=32)


def add_corpus_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--prompts", required=required,
                   help="corpus file (.jsonl/.json/.csv/.txt/.parquet), hf:NAME[:CONFIG[:SPLIT]], "
                        "or 'bigbench' for the default corpus")
    p.add_argument("--field", default=DEFAULT_FIELD, help="text field (default: %(default)s)")
    p.add_argument("--split", choices=(*SPLITS, "all"), default="all")
    p.add_argument("--limit", type=int, default=None, help="keep the first N prompts")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help="drop prompts longer than this many target tokens (default: %(default)s)")


def load_cli_target(args, device: str | None = None):
    from .targets import load_target

    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[args.dtype]
    return load_target(args.target, mode=args.mode, dtype=dtype, device=device or args.device,
                       system_prompt=args.system_prompt, batch_size=args.batch_size)


def load_cli_corpus(args, target):
    from .prompts import load_corpus

    return load_corpus(resolve_corpus(args.prompts), field_name=args.field,
                       count_tokens=target.count_tokens, max_tokens=args.max_tokens,
                       split=args.split, limit=args.limit)


# ----------------------------------------------------------------------------- commands
def cmd_data(args) -> None:
    from .bigbench import build_bigbench_corpus
    from .prompts import clean, read_rows

    path = build_bigbench_corpus(args.out, force=args.force)
    corpus = clean(read_rows(str(path)), str(path), max_tokens=None)
    print(f"default corpus: {path}")
    print(f"  {len(corpus)} prompts; splits: {corpus.split_counts()}")


def cmd_collect(args) -> None:
    from accelerate import PartialState

    from .collect import collect

    state = PartialState()
    device = str(state.device) if state.num_processes > 1 else None
    target = load_cli_target(args, device=device)
    corpus = load_cli_corpus(args, target)
    if state.is_main_process:
        print(f"target: {target.fingerprint.describe()}")
        print(f"corpus: {corpus.source}: {len(corpus)} prompts (split {args.split}); "
              f"dropped {corpus.dropped}")
    result = collect(
        target, corpus, args.out, split=args.split, steps=args.steps,
        store_dtype=args.store_dtype, shard_size=args.shard_size, batch_size=args.batch_size,
        process_index=state.process_index, num_processes=state.num_processes,
        wait_for_everyone=state.wait_for_everyone, progress=not args.no_progress,
    )
    if state.is_main_process:
        print(f"stored {result.num_prompts} prompts in {result.path} "
              f"({result.shards_written} shards written, {result.shards_skipped} resumed, "
              f"{result.dropped_over_context} over the target's context; "
              f"{result.prompts_per_second:.1f} prompts/s on process 0)")


def cmd_info(args) -> None:
    from .store import read_manifest

    print(json.dumps(read_manifest(args.store), indent=1))


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="logit2prompt", description="Recover hidden prompts from next-token distributions.")
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
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("info", help="print a store's manifest")
    p.add_argument("store")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
