"""Command-line flags: generated from config dataclasses, plus the argument groups that several
subcommands share (target, corpus, decoding, progress), each defined once here."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from ..data.corpus import DEFAULT_FIELD, DEFAULT_MAX_TOKENS, SPLITS
from ..targets import DEFAULT_TARGET, PROMPT_MODES

T = TypeVar("T")

SWITCH = "switch"  # bool fields as `--x` / `--no-x`
VALUE = "value"  # bool fields as `--x true` / `--x false` (train's flags since 0.1)
TARGET_DTYPES = ("fp32", "bf16", "fp16")
PROMPTS_HELP = (
    "corpus file (.jsonl/.json/.csv/.txt/.parquet), hf:NAME[:CONFIG[:SPLIT]], "
    "or 'bigbench' for the default corpus"
)


def flag_value(text: str) -> bool:
    """`--neighbour-copy false` and the like: argparse's bool() would take any text as True."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class _Switch(argparse.Action):
    """`--x` sets a bool field, `--no-x` clears it."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        flag = option_strings[0]
        super().__init__([flag, "--no-" + flag[2:]], dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, not option_string.startswith("--no-"))

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


class _Items(argparse.Action):
    """A tuple field: one or more words, each split on `sep` (None: not split); `''` is empty."""

    def __init__(self, *args: Any, sep: str | None, kind: type, **kwargs: Any) -> None:
        self.sep, self.kind = sep, kind
        super().__init__(*args, nargs="*", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parts = values if self.sep is None else [p for v in values for p in v.split(self.sep)]
        try:
            items = tuple(self.kind(p.strip()) for p in parts if p.strip())
        except ValueError as exc:
            parser.error(f"{option_string}: {exc}")
        setattr(namespace, self.dest, items)


class _Renamed(argparse.Action):
    """A flag that was renamed: refused with the new name rather than silently misread."""

    def __init__(self, option_strings: list[str], dest: str, *, new: str, **kwargs: Any) -> None:
        self.new = new
        kwargs.update(nargs="?", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(f"{option_string} was renamed to {self.new}")


def add_renamed_flag(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    """Refuse `old` (hidden from --help) and name `new` instead."""
    parser.add_argument(old, action=_Renamed, new=new, dest="renamed_" + old.strip("-"))


def _field_type(annotation: Any) -> tuple[type, bool]:
    """The flag's value type, and whether the field is a tuple of such values."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return _field_type(members[0])
    elif origin is tuple:
        return typing.get_args(annotation)[0], True
    elif annotation in (str, int, float, bool):
        return annotation, False
    raise TypeError(f"no command-line form for a field of type {annotation!r}")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _show(value: Any, sep: str | None) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return (sep or " ").join(map(str, value)) or "none"
    return "none" if value is None else str(value)


def add_dataclass_args(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    skip: Iterable[str] = (),
    rename: Mapping[str, str] | None = None,
    bools: str = SWITCH,
) -> None:
    """One flag per field of the dataclass `cls`, its dest the field's name.

    The flag is `--field-name` (or `--` + `rename[name]`); the value type comes from the
    annotation, a field without a default is a required flag, bools are `--x/--no-x` (SWITCH)
    or `--x true|false` (VALUE), tuples take words split on `metadata["sep"]` (default ","),
    and the help is `metadata["help"]` plus the default unless the help already names one.
    `metadata["choices"]` and `metadata["metavar"]` pass through to argparse.
    """
    rename = rename or {}
    skip = set(skip)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        kind, many = _field_type(hints[f.name])
        default = _default(f)
        sep = f.metadata.get("sep", ",")
        text = f.metadata.get("help", "").replace("%", "%%")  # argparse %-formats help
        kwargs: dict[str, Any] = {"dest": f.name}
        if default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
            if "default" not in text:
                text = f"{text} (default: {_show(default, sep)})".strip()
        kwargs["help"] = text or None
        name = rename.get(f.name, f.name).replace("_", "-")
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if many:
            kwargs.update(action=_Items, sep=sep, kind=kind)
        elif kind is bool and bools == SWITCH:
            kwargs["action"] = _Switch
        else:
            kwargs["type"] = flag_value if kind is bool else kind
        if "metavar" in f.metadata:
            kwargs["metavar"] = f.metadata["metavar"]
        elif not (kind is bool and bools == SWITCH) and "choices" not in kwargs:
            # the flag's name, not the field's: `--sample-size SAMPLE_SIZE`
            kwargs["metavar"] = name.replace("-", "_").upper()
        parser.add_argument("--" + name, **kwargs)


def config_from_args(cls: type[T], args: argparse.Namespace, **values: Any) -> T:
    """The dataclass `cls` from parsed flags: every field present in `args` (by name), with
    `values` for fields that have no flag of their own or need converting."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    found = {name: getattr(args, name) for name in names if hasattr(args, name)}
    return cls(**{**found, **values})


# ----------------------------------------------------------------------------- shared groups
def add_target_args(p: argparse.ArgumentParser, *, full: bool = True) -> None:
    """The target to query. `full=False`: only what a server needs (name, dtype, device)."""
    g = p.add_argument_group("target")
    g.add_argument(
        "--target",
        default=DEFAULT_TARGET,
        help="built-in name, local directory, .gguf file or hub id (default: %(default)s)",
    )
    if full:
        g.add_argument(
            "--mode",
            choices=PROMPT_MODES,
            default="user",
            help="raw text, the chat user turn, the chat system turn, or the system turn "
            "followed by a non-disclosure instruction (guarded) (default: %(default)s)",
        )
        g.add_argument(
            "--system-prompt",
            default=None,
            help="system message in user mode (default: the template's own)",
        )
        g.add_argument(
            "--user-turn",
            default=None,
            help="system and guarded modes: the innocuous user turn whose reply the attacker "
            'reads (default: "Hello!"; recorded in the fingerprint\'s template)',
        )
    g.add_argument(
        "--dtype",
        choices=TARGET_DTYPES,
        default="fp32",
        help="target weights dtype (default: %(default)s)",
    )
    g.add_argument("--device", default=None, help="torch device (default: cuda if present)")
    if not full:
        return
    g.add_argument(
        "--batch-size", type=int, default=32, help="prompts per target call (default: %(default)s)"
    )
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
    api.add_argument("--api-concurrency", type=int, default=8, help="(default: %(default)s)")
    api.add_argument("--api-rate-limit", type=float, default=None, help="requests per second")
    api.add_argument(
        "--api-max-queries",
        type=int,
        default=None,
        metavar="N",
        help="stop after sending N queries (refused ones count); a rerun resumes from the cache",
    )
    api.add_argument(
        "--api-cache",
        default=None,
        metavar="PATH",
        help="SQLite file of the endpoint's answers, reused when a run resumes (default: one "
        "per endpoint URL and model under the cache directory)",
    )
    api.add_argument(
        "--basis-from",
        default=None,
        metavar="TARGET",
        help="a white-box copy of the endpoint's model (e.g. smollm2-135m-instruct): full vectors "
        "are rebuilt from a token subset through its output layer (~d/(k-1) queries instead of "
        "V/(k-1)), checked on tokens outside the subset, else recovered exactly",
    )


def add_corpus_args(
    p: argparse.ArgumentParser,
    *,
    prompts: str | None = "required",
    max_tokens: bool = True,
) -> argparse._ArgumentGroup:
    """The prompts to read. `prompts`: "required", "optional", or None (the caller adds
    `--prompts` itself, e.g. into a mutually exclusive group); returns the group."""
    g = p.add_argument_group("corpus")
    if prompts is not None:
        g.add_argument("--prompts", required=prompts == "required", help=PROMPTS_HELP)
    g.add_argument("--field", default=DEFAULT_FIELD, help="text field (default: %(default)s)")
    g.add_argument(
        "--split", choices=(*SPLITS, "all"), default="all", help="(default: %(default)s)"
    )
    g.add_argument("--limit", type=int, default=None, help="keep the first N prompts")
    if max_tokens:
        g.add_argument(
            "--max-tokens",
            type=int,
            default=DEFAULT_MAX_TOKENS,
            help="drop prompts longer than this many target tokens (default: %(default)s)",
        )
    return g


def add_decoding_args(p: argparse.ArgumentParser, *, sampling: bool = True) -> None:
    """How the inverter decodes. `sampling=False`: beam search settings only."""
    g = p.add_argument_group("decoding")
    g.add_argument("--num-beams", type=int, default=1, help="(default: %(default)s)")
    g.add_argument(
        "--no-repeat-ngram-size",
        type=int,
        default=0,
        help="forbid repeating any n-gram of this size (0: off; default: %(default)s)",
    )
    if not sampling:
        return
    g.add_argument("--num-return-sequences", type=int, default=1, help="(default: %(default)s)")
    g.add_argument("--sample", action="store_true", help="sample instead of beam search")
    g.add_argument("--temperature", type=float, default=1.0, help="(default: %(default)s)")
    g.add_argument("--top-p", type=float, default=1.0, help="(default: %(default)s)")
    g.add_argument(
        "--bf16",
        action="store_true",
        help="decode under bf16 autocast (1.6-1.8x faster on a CPU; see decode_precision.py)",
    )


def add_progress_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
