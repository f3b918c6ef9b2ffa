"""`logit2prompt evaluate`: the inverter and the baselines on one prompt set, scored alike.

Prompts -> the checkpoint's target -> vectors -> every method's predictions -> per-example
metrics (BLEU, token F1, exact, cosine, KL, top-1) -> summary with 95% CIs, breakdowns by
prompt length and by task/source -> results.json, predictions.jsonl and report.html.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import Logit2PromptError
from .metrics import per_example_scores, summarize

BASELINES = ("nn", "constant", "extraction", "fewshot", "text")
GROUP_FIELDS = ("task", "source", "category", "type")  # the first one a corpus has is used
LENGTH_BUCKETS = ((1, 5), (6, 10), (11, 15), (16, 20), (21, 30), (31, 10_000))
MAX_GROUPS = 30
EXAMPLES_PER_KIND = 5
INVERTER = "inverter"
RERANKED = "inverter + neighbours, re-ranked by the target"
REFINED = "nearest neighbour, refined by the target"


@dataclass
class EvalConfig:
    """What to evaluate, on which prompts, against which baselines."""

    checkpoint: str
    prompts: str
    out: str
    baselines: tuple[str, ...] = ("nn", "constant")
    train_data: str | None = None  # the training store: nearest neighbour, constant, few-shot
    field: str = "prompt"
    split: str | None = None
    limit: int | None = None  # the first N prompts
    sample: int | None = None  # a seeded random N prompts (after --limit)
    num_beams: int = 1
    no_repeat_ngram_size: int = 0
    attacks: str | None = None  # JSON file of extraction strings (default: the built-in list)
    text_checkpoint: str | None = None  # a text-only inverter (`logit2prompt train-text`)
    rerank: bool = False  # add: inverter beams + nearest neighbours, re-ranked by the target
    refine_rounds: int = 0  # add: the nearest neighbour, refined by the target (refine.py)
    predictions: tuple[str, ...] = ()  # JSONL files of other methods' predictions to score
    semantic: bool = True
    functional: bool = True
    batch_size: int = 32
    progress: bool = True


def _check_baselines(cfg: EvalConfig) -> None:
    unknown = [b for b in cfg.baselines if b not in BASELINES]
    if unknown:
        raise Logit2PromptError(f"unknown baseline(s) {unknown}; choose from {BASELINES}")
    if "text" in cfg.baselines and not cfg.text_checkpoint:
        raise Logit2PromptError(
            "the text baseline needs a text-only inverter: pass --text-checkpoint "
            "(train one with `logit2prompt train-text`)"
        )
    needs_train = {"nn", "constant", "fewshot"} & set(cfg.baselines)
    if cfg.rerank:
        needs_train.add("rerank")
    if cfg.refine_rounds < 0:
        raise Logit2PromptError(f"refine rounds must be >= 0, got {cfg.refine_rounds}")
    if cfg.refine_rounds:
        needs_train.add("refine")
    if needs_train and not cfg.train_data:
        raise Logit2PromptError(
            f"baseline(s) {sorted(needs_train)} need the training store: pass --train-data"
        )


def method_predictions(cfg: EvalConfig, inverter, target, references, vectors) -> dict:
    """Every method's prediction for every reference, keyed by the name the report shows."""
    from ..attacks.nearest import constant_guess, nearest_neighbour, nearest_neighbours
    from ..attacks.rerank import (
        DEFAULT_BEAMS,
        DEFAULT_NEIGHBOURS,
        inverter_with_neighbours,
        proposals_with_neighbours,
    )
    from ..data.store import DistributionStore

    preds: dict[str, list[str]] = {}
    say = print if cfg.progress else (lambda *a, **k: None)
    say(f"inverting {len(references)} prompts", flush=True)
    # With --rerank at the re-ranker's beam count, one beam search serves both: its top beam
    # is the inverter's answer and all its beams are the re-ranker's candidates.
    shared = cfg.rerank and cfg.num_beams == DEFAULT_BEAMS
    beams = inverter.invert(
        torch.from_numpy(vectors),
        num_beams=cfg.num_beams,
        num_return_sequences=cfg.num_beams if shared else 1,
        no_repeat_ngram_size=cfg.no_repeat_ngram_size,
        batch_size=cfg.batch_size,
        grouped=True,
    )
    preds[INVERTER] = [row[0] for row in beams]
    train = None
    if cfg.train_data:
        train = DistributionStore(cfg.train_data)
        diffs = inverter.fingerprint.differences(train.fingerprint) if inverter.fingerprint else []
        if diffs:
            raise Logit2PromptError(
                f"--train-data {cfg.train_data} comes from another target: {'; '.join(diffs)}"
            )
    nearest = None
    if cfg.rerank:
        say("re-ranking inverter beams and neighbours with the target", flush=True)
        near = nearest_neighbours(train, vectors, DEFAULT_NEIGHBOURS)
        nearest = [train.prompts[row[0]] for row in near]  # the baseline, same search
        if shared:
            preds[RERANKED] = proposals_with_neighbours(
                target, train, vectors, beams, DEFAULT_NEIGHBOURS, cfg.batch_size, near=near
            )
        else:
            preds[RERANKED] = inverter_with_neighbours(
                inverter,
                target,
                train,
                vectors,
                no_repeat_ngram_size=cfg.no_repeat_ngram_size,
                batch_size=cfg.batch_size,
                near=near,
            )
    if cfg.refine_rounds:
        from ..attacks.refine import RefineConfig, refine_nearest

        say(f"refining nearest neighbours with the target ({cfg.refine_rounds} rounds)", flush=True)
        nearest, refined = refine_nearest(
            inverter,
            target,
            train,
            vectors,
            RefineConfig(rounds=cfg.refine_rounds, target_batch=cfg.batch_size),
            cfg.progress,
        )
        preds[REFINED] = refined.prompts
    if "nn" in cfg.baselines:
        if nearest is None:  # else re-ranking or refinement found it already
            say("nearest neighbour", flush=True)
            nearest = nearest_neighbour(train, vectors)
        preds["nearest neighbour"] = nearest
    if "constant" in cfg.baselines:
        preds["constant guess"] = [constant_guess(train.prompts)] * len(references)
    if "extraction" in cfg.baselines:
        from ..attacks.extraction import best_and_oracle, extraction_predictions, load_attacks

        attacks = load_attacks(cfg.attacks)
        say(f"extraction attacks: {len(attacks)} strings", flush=True)
        replies = extraction_predictions(target, references, attacks)
        best, best_preds, oracle = best_and_oracle(replies, references)
        preds["extraction (best string)"] = best_preds
        preds["extraction (oracle)"] = oracle
        preds["_best_attack"] = best  # type: ignore[assignment]
    if "fewshot" in cfg.baselines:
        from ..attacks.fewshot import DEFAULT_SHOTS, fewshot_predictions

        say("few-shot prompting", flush=True)
        rng = np.random.default_rng(0)
        idx = sorted(rng.choice(len(train), DEFAULT_SHOTS, replace=False).tolist())
        shots = [(train.prompts[i], torch.from_numpy(train.vectors([i])[0, 0])) for i in idx]
        preds["few-shot"] = fewshot_predictions(target, torch.from_numpy(vectors[:, 0]), shots)
    if "text" in cfg.baselines:
        from ..models.text_inverter import TextInverter, target_outputs

        model = TextInverter.from_pretrained(cfg.text_checkpoint)
        if model.fingerprint and model.fingerprint.get("id") != target.fingerprint.id:
            raise Logit2PromptError(
                f"the text inverter {cfg.text_checkpoint} was trained on another target "
                f"({model.fingerprint.get('name')}, id {model.fingerprint.get('id')})"
            )
        say("text-only inversion: generating the target's replies", flush=True)
        preds["text-only inversion"] = model.invert(target_outputs(target, references))
    return preds


PREDICTION_FIELDS = ("recovered", "prediction")


def read_predictions(path: str, references: list[str]) -> list[str]:
    """Another method's predictions, one JSON object per line with the hidden prompt ('hidden')
    and the prediction ('recovered' or 'prediction'), in the order of the evaluated prompts."""
    from ..data.corpus import normalise

    try:
        rows = [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x]
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
        out.append(pred[0] if isinstance(pred, list) else str(pred))
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


def length_breakdown(references, per) -> list[dict]:
    lengths = [len(r.split()) for r in references]
    rows = []
    for lo, hi in LENGTH_BUCKETS:
        idx = [i for i, n in enumerate(lengths) if lo <= n <= hi]
        if not idx:
            continue
        label = f"{lo}-{hi}" if hi < 10_000 else f"{lo}+"
        rows.append(
            {
                "words": label,
                "n": len(idx),
                "bleu": {m: float(np.mean([s["bleu"][i] for i in idx])) for m, s in per.items()},
                "token_f1": {
                    m: 100 * float(np.mean([s["token_f1"][i] for i in idx])) for m, s in per.items()
                },
            }
        )
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


def evaluate(cfg: EvalConfig) -> dict:
    """Run the evaluation; writes results.json, predictions.jsonl and report.html under out."""
    from ..attacks.invert import target_for
    from ..data.collect import collect_vectors
    from ..data.corpus import load_corpus, resolve_corpus
    from ..models.inverter import Inverter
    from .report import write_report

    _check_baselines(cfg)
    inverter = Inverter.from_pretrained(cfg.checkpoint)
    target = target_for(inverter, batch_size=cfg.batch_size)
    corpus = load_corpus(
        resolve_corpus(cfg.prompts),
        field_name=cfg.field,
        count_tokens=target.count_tokens,
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
    if cfg.progress:
        print(f"{len(references)} prompts from {cfg.prompts}; collecting vectors", flush=True)
    vectors = collect_vectors(target, references, inverter.config.steps, cfg.batch_size)
    preds = method_predictions(cfg, inverter, target, references, vectors)
    best_attack = preds.pop("_best_attack", None)
    for path in cfg.predictions:
        preds[Path(path).stem] = read_predictions(path, references)
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
        "summary": summary,
        "by_length": length_breakdown(references, per),
        "group_field": field,
        "by_group": groups,
        "examples": examples(references, preds, per),
    }
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
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
