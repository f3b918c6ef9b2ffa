"""`logit2prompt evaluate`: the inverter and the baselines on one prompt set, scored alike.

Prompts -> the checkpoint's target -> vectors -> every method's predictions -> per-example
metrics (BLEU, token F1, exact, cosine, KL, top-1) -> summary with 95% CIs, breakdowns by
prompt length and by task/source -> results.json, predictions.jsonl and report.html.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..cache import atomic_open
from ..data.corpus import DEFAULT_MAX_TOKENS
from ..defenses.leak import LeakFilter
from ..errors import Logit2PromptError
from ..recipes import methods
from ..recipes.methods import INVERTER, REFINED, RERANKED  # noqa: F401 (their row names)
from ..targets.base import SYSTEM_MODES
from .metrics import per_example_scores, summarize

logger = logging.getLogger(__name__)

# Methods an EvalConfig field selects (the inverter always runs); --baselines names the rest.
FLAGGED = {
    "inverter": lambda cfg: True,
    "fallback": lambda cfg: cfg.fallback,
    "rerank": lambda cfg: cfg.rerank,
    "refine": lambda cfg: cfg.refine_rounds > 0,
    "mbr": lambda cfg: cfg.mbr_samples > 0,
    "search": lambda cfg: cfg.search or bool(cfg.search_with),
}
GROUP_FIELDS = ("task", "source", "category", "type")  # the first one a corpus has is used
# In target tokens, the unit of `--max-tokens`; past 64 is where the paper's setting ends.
LENGTH_BUCKETS = ((1, 8), (9, 16), (17, 32), (33, 64), (65, 128), (129, 256), (257, 1 << 30))
MAX_GROUPS = 30
EXAMPLES_PER_KIND = 5


@dataclass
class EvalConfig:
    """What to evaluate, on which prompts, against which baselines."""

    checkpoint: str = dataclasses.field(
        metadata={"help": "the inverter checkpoint, or a shipped inverter by name (default)"}
    )
    prompts: str
    out: str = dataclasses.field(
        metadata={"help": "output directory (results.json, predictions.jsonl, report.html)"}
    )
    baselines: tuple[str, ...] = dataclasses.field(
        default=("nn", "constant"),
        metadata={"help": "comma-separated: nn, constant, extraction, fewshot, text, or ''"},
    )
    train_data: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "the training store (nn, constant, fewshot, --rerank, --refine-rounds); "
            "without it they search the inverter's neighbour memory, if it has one"
        },
    )
    field: str = "prompt"
    split: str | None = None
    limit: int | None = None  # the first N prompts
    max_tokens: int = dataclasses.field(
        default=DEFAULT_MAX_TOKENS,
        metadata={"help": "drop prompts longer than this many target tokens"},
    )
    sample: int | None = dataclasses.field(
        default=None, metadata={"help": "a seeded random N of the prompts (after --limit)"}
    )
    num_beams: int = 1
    no_repeat_ngram_size: int = 0
    steps: int | None = dataclasses.field(
        default=None,
        metadata={
            "help": "observation steps per prompt at inversion, and for --rerank/--refine "
            "(default: as many as the inverter was trained on; more: test-time extension)"
        },
    )
    attacks: str | None = dataclasses.field(
        default=None,
        metadata={"help": "JSON file of extraction attack strings (default: the built-in list)"},
    )
    text_checkpoint: str | None = dataclasses.field(
        default=None, metadata={"help": "a text-only inverter (`logit2prompt train-text`)"}
    )
    leak_filter: float | None = dataclasses.field(
        default=None,
        metadata={
            "help": "a guarded deployment's reply filter: a reply repeating this fraction of "
            "the hidden prompt's word 3-grams is refused (extraction faces it; its cost on "
            "innocuous turns is reported)"
        },
    )
    rerank: bool = dataclasses.field(
        default=False,
        metadata={"help": "also score inverter beams + nearest neighbours re-ranked by the target"},
    )
    refine_rounds: int = dataclasses.field(
        default=0,
        metadata={"help": "also score the nearest neighbour refined by the target (refine.py)"},
    )
    # `field` is a field name here, so the dataclasses function goes by its module.
    fallback: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "also score the inverter's output where it is confident, else the nearest "
            "training prompt (no target queries; needs --train-data)"
        },
    )
    mbr_samples: int = dataclasses.field(
        default=0,
        metadata={
            "help": "also score the minimum-Bayes-risk choice among the inverter's greedy output "
            "and this many samples (no target queries; 0: off)"
        },
    )
    search: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "also score the search: the inverter's output, memory neighbours and the "
            "observed reply, judged by the target's teacher-forced KL (white-box target)"
        },
    )
    search_with: tuple[str, ...] = dataclasses.field(
        default=(),
        metadata={
            "help": "more inverters for the search (implies --search), each asking its own "
            "innocuous turn (user mode: all read the one reply to the hidden prompt); their "
            "candidates join, and every turn judges",
            "sep": None,
        },
    )
    search_shortlist: int = dataclasses.field(
        default=0,
        metadata={
            "help": "the search's later turns judge only each prompt's K best candidates after "
            "the first turn (0: every candidate on every turn; fewer target passes)"
        },
    )
    search_neighbours: int = dataclasses.field(
        default=8,
        metadata={"help": "memorised prompts each inverter proposes to the search"},
    )
    search_samples: int = dataclasses.field(
        default=0,
        metadata={
            "help": "prompts each inverter samples for the search (temperature 1, top-k 50, "
            "top-p 0.95, seeded; more candidates for the target to judge)"
        },
    )
    search_rounds: int = dataclasses.field(
        default=0,
        metadata={
            "help": "rounds in which each neighbour-reading inverter proposes again, reading "
            "the search's least-KL candidates as its neighbours (slower; pays in user mode)"
        },
    )
    search_task_guesses: bool = dataclasses.field(
        default=True,
        metadata={
            "help": "with several turns, a reply that describes the task ('The task is to "
            "...') turned into an instruction takes the choice's place where it explains the "
            "other turns better"
        },
    )
    predictions: tuple[str, ...] = dataclasses.field(
        default=(),
        metadata={
            "help": "JSONL files of other methods' predictions ({hidden, recovered})",
            "sep": None,
        },
    )
    semantic: bool = dataclasses.field(default=True, metadata={"help": "MiniLM cosine"})
    functional: bool = dataclasses.field(default=True, metadata={"help": "KL / top-1 agreement"})
    batch_size: int = dataclasses.field(default=32, metadata={"help": "target batch"})
    progress: bool = True


def baseline_keys() -> tuple[str, ...]:
    """What --baselines may name: every registered method no EvalConfig field selects."""
    return tuple(k for k in methods.method_keys() if k not in FLAGGED)


def selected_methods(cfg: EvalConfig) -> list[str]:
    """The registry keys this evaluation runs, in run (and report) order."""
    chosen = {k for k, on in FLAGGED.items() if on(cfg)} | set(cfg.baselines)
    return [k for k in methods.method_keys() if k in chosen]


def _check_baselines(cfg: EvalConfig) -> None:
    choices = baseline_keys()
    unknown = [b for b in cfg.baselines if b not in choices]
    if unknown:
        raise Logit2PromptError(f"unknown baseline(s) {unknown}; choose from {choices}")
    if cfg.refine_rounds < 0:
        raise Logit2PromptError(f"refine rounds must be >= 0, got {cfg.refine_rounds}")
    if cfg.mbr_samples == 1 or cfg.mbr_samples < 0:
        raise Logit2PromptError(
            f"--mbr-samples must be 0 (off) or at least 2, got {cfg.mbr_samples}"
        )
    if cfg.search_shortlist < 0:
        raise Logit2PromptError(f"--search-shortlist must be >= 0, got {cfg.search_shortlist}")
    if cfg.search_neighbours < 0:
        raise Logit2PromptError(f"--search-neighbours must be >= 0, got {cfg.search_neighbours}")
    if cfg.search_samples < 0:
        raise Logit2PromptError(f"--search-samples must be >= 0, got {cfg.search_samples}")
    if cfg.search_rounds < 0:
        raise Logit2PromptError(f"--search-rounds must be >= 0, got {cfg.search_rounds}")
    check_prediction_names(cfg)
    from ..models.pretrained import resolve_checkpoint

    for other in cfg.search_with:  # a mistyped checkpoint fails before any target work
        resolve_checkpoint(other)


def _check_needs(cfg: EvalConfig, memory: bool, subset: bool = False) -> None:
    """Every selected method can run: a training store, or for the methods that only need the
    training prompts, the inverter's own neighbour memory (`memory`); refinement compares
    whole vectors, which an inverter of a token subset (`subset`) does not read."""
    if cfg.refine_rounds and subset:
        raise Logit2PromptError(
            "--refine-rounds compares whole next-token vectors; this inverter reads a token "
            "subset (--subset-size), so refinement cannot run with it"
        )
    available = {"inverter", "target", "references"}
    if cfg.train_data:
        available |= {"train", "store"}
    elif memory:
        available.add("train")
    if cfg.text_checkpoint:
        available.add("text_checkpoint")
    hints = {
        "train": "pass --train-data (or use an inverter that carries a neighbour memory)",
        "store": "pass --train-data (a neighbour memory holds no vectors)",
        "text_checkpoint": "pass --text-checkpoint (train one with `logit2prompt train-text`)",
    }
    methods.check_requirements(selected_methods(cfg), available, hints)


def method_context(cfg: EvalConfig, inverter, target, references, vectors) -> methods.MethodContext:
    """The methods' shared context for this evaluation (the training store loaded and checked
    to come from the inverter's target)."""
    from ..attacks.nearest import MemoryNeighbours
    from ..data.store import DistributionStore

    train = None
    if not cfg.train_data and inverter.memory is not None:
        # A shipped inverter carries its training prompts: nn, rerank, ... need no store.
        logger.info("no --train-data: the baselines search the inverter's neighbour memory")
        train = MemoryNeighbours(inverter)
    if cfg.train_data:
        train = DistributionStore(cfg.train_data)
        diffs = inverter.fingerprint.differences(train.fingerprint) if inverter.fingerprint else []
        if diffs:
            raise Logit2PromptError(
                f"--train-data {cfg.train_data} comes from another target: {'; '.join(diffs)}"
            )
    return methods.MethodContext(
        inverter,
        vectors,
        target=target,
        train=train,
        references=references,
        num_beams=cfg.num_beams,
        no_repeat_ngram_size=cfg.no_repeat_ngram_size,
        batch_size=cfg.batch_size,
        refine_rounds=cfg.refine_rounds,
        mbr_samples=cfg.mbr_samples,
        search_with=tuple(cfg.search_with),
        search_shortlist=cfg.search_shortlist or None,
        search_neighbours=cfg.search_neighbours,
        search_samples=cfg.search_samples,
        search_rounds=cfg.search_rounds,
        search_task_guesses=cfg.search_task_guesses,
        attacks=cfg.attacks,
        leak_filter=LeakFilter(cfg.leak_filter) if cfg.leak_filter else None,
        text_checkpoint=cfg.text_checkpoint,
        progress=cfg.progress,
    )


def baseline_prompts(train) -> dict | None:
    """Where the nearest-neighbour style baselines found their training prompts."""
    from ..attacks.nearest import MemoryNeighbours

    if train is None:
        return None
    source = "neighbour memory" if isinstance(train, MemoryNeighbours) else "store"
    return {"source": source, "n": len(train)}


def method_predictions(cfg: EvalConfig, inverter, target, references, vectors) -> dict:
    """Every selected method's prediction for every reference, keyed by the row name the
    report shows."""
    ctx = method_context(cfg, inverter, target, references, vectors)
    return methods.run_methods(selected_methods(cfg), ctx)


PREDICTION_FIELDS = ("recovered", "prediction")


def check_prediction_names(cfg: EvalConfig) -> None:
    """Each --predictions file's row is named by its stem: two files of one stem, or a stem
    that is a selected method's row, are refused before anything loads."""
    names = [Path(p).stem for p in cfg.predictions]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise Logit2PromptError(f"--predictions: several files would be rows named {twice}")
    rows = {n for key in selected_methods(cfg) for n in methods.get_method(key).names}
    for path, name in zip(cfg.predictions, names, strict=True):
        if name in rows:
            raise Logit2PromptError(
                f"--predictions {path}: a row named {name!r} is already scored; rename the file"
            )


def read_other_predictions(paths: tuple[str, ...], references: list[str]) -> dict[str, list[str]]:
    """Each --predictions file's rows, keyed by the row name the report gives it (its stem)."""
    return {Path(p).stem: read_predictions(p, references) for p in paths}


def read_predictions(path: str, references: list[str]) -> list[str]:
    """Another method's predictions, one JSON object per line with the hidden prompt ('hidden')
    and the prediction ('recovered' or 'prediction'), in the order of the evaluated prompts."""
    from ..data.corpus import normalise, text_lines

    try:
        rows = [json.loads(x) for x in text_lines(Path(path).read_text(encoding="utf-8")) if x]
    except (OSError, ValueError) as exc:
        raise Logit2PromptError(f"cannot read predictions {path}: {exc}") from exc
    if len(rows) != len(references):
        raise Logit2PromptError(
            f"{path} has {len(rows)} predictions but {len(references)} prompts are evaluated; "
            "the rows must pair up with the prompts (same file, --limit and --sample)"
        )
    out = []
    for i, (row, ref) in enumerate(zip(rows, references, strict=True)):
        field = next((f for f in PREDICTION_FIELDS if f in row), None)
        if field is None or "hidden" not in row:
            raise Logit2PromptError(f"{path} line {i + 1} needs 'hidden' and 'recovered' fields")
        if normalise(str(row["hidden"])) != normalise(ref):
            raise Logit2PromptError(
                f"{path} line {i + 1} is for {row['hidden']!r}, but prompt {i + 1} is {ref!r}"
            )
        pred = row[field]
        pred = pred[0] if isinstance(pred, list) and pred else pred
        if not isinstance(pred, str):
            raise Logit2PromptError(f"{path} line {i + 1}: {field!r} is not a string: {pred!r}")
        out.append(pred)
    return out


def score_methods(
    cfg, target, preds, references, vectors: np.ndarray | None = None
) -> dict[str, dict[str, list[float]]]:
    """Per-example metrics of every method; `vectors` (the references' `[n, steps, vocab]`)
    spares rerunning the target on the references for every method."""
    per: dict[str, dict[str, list[float]]] = {}
    encoder = None
    if cfg.semantic:
        from .similarity import default_encoder

        encoder = default_encoder()
    for method, p in preds.items():
        first = [x[0] if isinstance(x, list) else x for x in p]
        scores = per_example_scores(first, references)
        if encoder is not None:
            from .similarity import cosine_similarity

            scores["cosine"] = cosine_similarity(first, references, encoder)
        if cfg.functional:
            from .functional import functional_scores

            ref_lp = vectors[:, 0] if vectors is not None else None
            scores.update(functional_scores(target, first, references, cfg.batch_size, ref_lp))
        per[method] = scores
    return per


def token_counts(records: Sequence, target) -> list[int]:
    """Target tokens per record: the corpus's length filter counted them already."""
    if all(r.tokens is not None for r in records):
        return [r.tokens for r in records]
    return target.count_tokens([r.text for r in records])


def length_breakdown(
    lengths: Sequence[int], per, refused: Sequence[bool] | None = None
) -> list[dict]:
    """Mean BLEU and token F1 per method in each bucket of `LENGTH_BUCKETS` (target tokens of
    the hidden prompt); with `refused` (per prompt: the leak filter refused the best extraction
    string's reply), how many it refused in each bucket."""
    rows = []
    for lo, hi in LENGTH_BUCKETS:
        idx = [i for i, n in enumerate(lengths) if lo <= n <= hi]
        if not idx:
            continue
        label = f"{lo}-{hi}" if hi < LENGTH_BUCKETS[-1][1] else f"{lo}+"
        row = {
            "tokens": label,
            "n": len(idx),
            "bleu": {m: float(np.mean([s["bleu"][i] for i in idx])) for m, s in per.items()},
            "token_f1": {
                m: 100 * float(np.mean([s["token_f1"][i] for i in idx])) for m, s in per.items()
            },
        }
        if refused is not None:
            row["extraction_refused"] = sum(bool(refused[i]) for i in idx)
        rows.append(row)
    return rows


def group_breakdown(metas, per) -> tuple[str | None, list[dict]]:
    field = next((f for f in GROUP_FIELDS if any(f in m for m in metas)), None)
    if field is None:
        return None, []
    groups: dict[str, list[int]] = {}
    for i, m in enumerate(metas):
        groups.setdefault(str(m.get(field, "?")), []).append(i)
    ordered = sorted(groups.items(), key=lambda kv: -len(kv[1]))[:MAX_GROUPS]
    return field, [
        {
            "group": g,
            "n": len(idx),
            "bleu": {m: float(np.mean([s["bleu"][i] for i in idx])) for m, s in per.items()},
        }
        for g, idx in ordered
    ]


def examples(references, preds, per) -> dict[str, list[dict]]:
    """Best, median and worst inverter examples by BLEU, with every method beside them."""
    order = np.argsort(per[INVERTER]["bleu"], kind="stable")[::-1]
    n, k = len(order), min(EXAMPLES_PER_KIND, len(order))
    mid = max(0, n // 2 - k // 2)
    picks = {"best": order[:k], "median": order[mid : mid + k], "worst": order[n - k :][::-1]}
    return {
        kind: [
            {
                "hidden": references[i],
                "predictions": {m: _first(p[i]) for m, p in preds.items()},
                "bleu": {m: per[m]["bleu"][i] for m in per},
            }
            for i in idx.tolist()
        ]
        for kind, idx in picks.items()
    }


def _first(x):
    return x[0] if isinstance(x, list) else x


def leak_filter_report(cfg: EvalConfig, target, references, notes: dict) -> dict | None:
    """What the reply filter did: extraction replies it refused, and what it costs, the
    target's replies to the innocuous user turn it refuses too (system modes only)."""
    if not cfg.leak_filter:
        return None
    leak = LeakFilter(cfg.leak_filter)
    report = {
        "threshold": cfg.leak_filter,
        "extraction_refused": notes.get("extraction_refused"),
        "innocuous_refused": None,
    }
    if target.mode in SYSTEM_MODES:
        replies = target.complete([target.render(p) for p in references])
        refused = sum(leak.blocks(r, p) for r, p in zip(replies, references, strict=True))
        report["innocuous_refused"] = {"refused": refused, "n": len(references)}
        logger.info("leak filter: %d of %d innocuous replies refused", refused, len(references))
    return report


def evaluate(cfg: EvalConfig) -> dict:
    """Run the evaluation; writes results.json, predictions.jsonl and report.html under out."""
    from ..attacks.invert import target_for
    from ..data.collect import collect_vectors
    from ..data.corpus import load_corpus, resolve_corpus
    from ..models.inverter import Inverter
    from .report import write_report

    _check_baselines(cfg)
    inverter = Inverter.from_pretrained(cfg.checkpoint)
    _check_needs(cfg, inverter.memory is not None, inverter.token_subset is not None)
    target = target_for(inverter, batch_size=cfg.batch_size)
    corpus = load_corpus(
        resolve_corpus(cfg.prompts),
        field_name=cfg.field,
        count_tokens=target.count_tokens,
        max_tokens=cfg.max_tokens,
        split=cfg.split,
        limit=cfg.limit,
    )
    records = corpus.records
    if cfg.sample and len(records) > cfg.sample:
        # Corpus files are often grouped by task: a random subset represents them all.
        keep = sorted(np.random.default_rng(0).choice(len(records), cfg.sample, replace=False))
        records = [records[i] for i in keep]
    references = [r.text for r in records]
    metas = [r.meta for r in records]
    # Other methods' files are read before any target work, so a bad one costs nothing.
    others = read_other_predictions(cfg.predictions, references)
    logger.info("%d prompts from %s; collecting vectors", len(references), cfg.prompts)
    steps = cfg.steps or inverter.config.steps
    if not 1 <= steps <= inverter.config.max_steps:
        raise Logit2PromptError(
            f"--steps {steps}: this inverter reads 1 to {inverter.config.max_steps} steps"
        )
    vectors = collect_vectors(target, references, steps, cfg.batch_size)
    ctx = method_context(cfg, inverter, target, references, vectors)
    preds = methods.run_methods(selected_methods(cfg), ctx)
    best_attack = ctx.notes.get("best_attack")
    leak = leak_filter_report(cfg, target, references, ctx.notes)
    preds.update(others)  # names checked up front (check_prediction_names)
    per = score_methods(cfg, target, preds, references, vectors)
    summary = {m: {**summarize(s), "n": {"mean": len(references)}} for m, s in per.items()}
    field, groups = group_breakdown(metas, per)
    results = {
        "config": asdict(cfg),
        "target": target.fingerprint.to_dict(),
        "corpus": {
            "source": corpus.source,
            "n": len(references),
            "available": len(corpus),
            "dropped": corpus.dropped,
        },
        "best_attack": best_attack,
        "baseline_prompts": baseline_prompts(ctx.train),
        "leak_filter": leak,
        "summary": summary,
        "by_length": length_breakdown(
            token_counts(records, target),
            per,
            ctx.notes.get("extraction_blocked", {}).get(best_attack),
        ),
        "group_field": field,
        "by_group": groups,
        "examples": examples(references, preds, per),
    }
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_open(out / "results.json") as f:
        f.write(json.dumps(results, indent=1, ensure_ascii=False))
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for i, ref in enumerate(references):
            row = {
                "hidden": ref,
                "meta": metas[i],
                "predictions": {m: _first(p[i]) for m, p in preds.items()},
                "scores": {m: {k: v[i] for k, v in s.items()} for m, s in per.items()},
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    write_report(results, out / "report.html")
    return results
