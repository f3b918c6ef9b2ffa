"""A learned judge for the search: weights over what the attacker sees of each candidate (its
KL per turn, where it came from, its length, how much the pool agrees with it), fit on the
judged pools of dev prompts, then applied once to the pools of the scored prompts.

    python benchmarks/judge_fit.py --dev benchmarks/results/search_samples16-guarded-dev.json \
        --test benchmarks/results/search_samples16-guarded.json [--out ...]

The search picks the least summed KL (`attacks/search.py`). Out of domain that keeps half to
two thirds of its pool's best (`two_turns.py --rescore`); in guarded mode it picks a memorised
training prompt for 39-60% of prompts (by set), where the pool's best is one for 15-33%. Both
files are `two_turns.py` results with saved pools (`candidates`, `origins`, `kl`); the dev
file's prompts must not be the test file's (`two_turns.py --dev 50`: per set, 50 of the rows
not scored, near duplicates removed). The judge is linear in the features below; its objective
(listwise cross-entropy against each pool's softmax of utility/T, or the expected utility under
the judge's softmax; utility = (BLEU/100 + token F1)/2 against the hidden prompt) and L2
penalty are chosen by 5-fold cross-validation on the dev pools only, against the least-KL rule
there. The test pools are scored once: the learned choice against the least-KL choice and the
test file's extraction row, paired per prompt (95% bootstrap CIs). No target passes: the KLs
are the saved ones. Writes benchmarks/results/judge_fit.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from two_turns import extraction_row, saved_kl

from logit2prompt.evaluation.metrics import format_ci, paired_gain, score, sentence_bleu, token_f1
from logit2prompt.evaluation.results import write_results

logger = logging.getLogger(__name__)
RESULTS = Path(__file__).parent / "results" / "judge_fit.json"
ORIGINS = ("memory", "reply", "sample")  # against "inverter" (the greedy outputs)
TEMPERATURE = 0.05
PENALTIES = (1e-3, 1e-2, 1e-1, 1.0)
OBJECTIVES = ("listwise", "expected")


def features(example: dict, turns: list[str]) -> tuple[list[str], np.ndarray, list[str]]:
    """(usable candidates, [n, d] features, feature names) of one saved pool; what any attacker
    running the search has: no hidden prompt."""
    usable = [j for j, c in enumerate(example["candidates"]) if c.strip()]
    cands = [example["candidates"][j] for j in usable]
    if not cands:
        return [], np.zeros((0, 0)), []
    per_turn = [saved_kl(example, t)[usable] for t in turns]
    total = sum(per_turn)

    def z(x: np.ndarray) -> np.ndarray:
        return (x - x.mean()) / (x.std() + 1e-6)

    cols, names = [z(total), total - total.min()], ["KL z", "KL above the least"]
    if len(turns) > 1:
        cols += [z(k) for k in per_turn]
        names += [f"KL z on {t!r}" for t in turns]
    kinds = [example["origins"][j].split(":")[0] for j in usable]
    for o in ORIGINS:
        cols.append(np.array([k == o for k in kinds], dtype=float))
        names.append(f"from {o}")
    words = np.log1p([len(c.split()) for c in cands])
    cols.append(words - np.median(words))
    names.append("log length vs the pool's median")
    f1 = np.array([[token_f1(a, b) for b in cands] for a in cands])
    np.fill_diagonal(f1, np.nan)
    cols.append(np.nan_to_num(np.nanmean(f1, axis=1)) if len(cands) > 1 else np.zeros(1))
    names.append("mean token F1 with the pool")
    counts = {c: cands.count(c) for c in set(cands)}
    cols.append(np.log([counts[c] for c in cands]))
    names.append("log copies in the pool")
    return cands, np.stack(cols, axis=1), names


def pools(path: str) -> tuple[dict, list[dict]]:
    results = json.loads(Path(path).read_text())
    out = []
    for e in results["examples"]:
        cands, x, names = features(e, results["turns"])
        if not cands:
            continue
        bleu = np.array([sentence_bleu(c, e["hidden"]) for c in cands])
        f1 = np.array([100 * token_f1(c, e["hidden"]) for c in cands])
        out.append({"example": e, "cands": cands, "x": x, "names": names, "bleu": bleu, "f1": f1})
    return results, out


def fit(
    train: list[dict], penalty: float, objective: str = "listwise"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Standardised linear weights (mean, scale, w) + L2: `listwise` cross-entropy against the
    softmax of utility/T, or `expected` utility under the judge's softmax."""
    allx = np.concatenate([p["x"] for p in train])
    mean, scale = allx.mean(0), allx.std(0) + 1e-6
    xs = [torch.tensor((p["x"] - mean) / scale, dtype=torch.float64) for p in train]
    us = [torch.tensor((p["bleu"] + p["f1"]) / 200, dtype=torch.float64) for p in train]
    ts = [torch.softmax(u / TEMPERATURE, 0) for u in us]
    w = torch.zeros(allx.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        if objective == "listwise":
            pairs = zip(xs, ts, strict=True)
            fit_loss = sum(-(t * torch.log_softmax(x @ w, 0)).sum() for x, t in pairs)
        else:
            pairs = zip(xs, us, strict=True)
            fit_loss = sum(-(torch.softmax(x @ w, 0) * u).sum() for x, u in pairs)
        value = fit_loss / len(xs) + penalty * (w**2).sum()
        value.backward()
        return value

    opt.step(loss)
    return mean, scale, w.detach().numpy()


def choose(pool: dict, model) -> int:
    mean, scale, w = model
    return int(np.argmax(((pool["x"] - mean) / scale) @ w))


def least_kl(pool: dict) -> int:
    return int(np.argmin(pool["x"][:, 1]))  # "KL above the least"


def utility(pool: dict, j: int) -> float:
    return float((pool["bleu"][j] + pool["f1"][j]) / 2)


def cross_validate(dev: list[dict], folds: int = 5) -> dict[tuple[str, float], float]:
    """Mean held-out utility of each (objective, penalty) over `folds` splits of the dev pools."""
    order = np.random.default_rng(0).permutation(len(dev))
    out = {}
    for objective in OBJECTIVES:
        for penalty in PENALTIES:
            got = []
            for k in range(folds):
                held = set(order[k::folds].tolist())
                model = fit([p for i, p in enumerate(dev) if i not in held], penalty, objective)
                got += [utility(dev[i], choose(dev[i], model)) for i in held]
            out[(objective, penalty)] = float(np.mean(got))
    return out


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dev", required=True, help="two_turns.py results of the dev prompts")
    parser.add_argument("--test", required=True, help="two_turns.py results of scored prompts")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    dev_results, dev = pools(args.dev)
    test_results, test = pools(args.test)
    if (
        dev_results["turns"] != test_results["turns"]
        or dev_results["checkpoints"] != test_results["checkpoints"]
    ):
        sys.exit("dev and test pools come from different searches (turns or checkpoints differ)")
    overlap = {p["example"]["hidden"] for p in dev} & {p["example"]["hidden"] for p in test}
    if overlap:
        sys.exit(f"{len(overlap)} dev prompts are also test prompts")
    rule = float(np.mean([utility(p, least_kl(p)) for p in dev]))
    cv = cross_validate(dev)
    objective, penalty = max(cv, key=cv.get)
    # The least-KL rule stays unless a learned judge beats it in cross-validation on dev.
    learned_wins = cv[(objective, penalty)] > rule
    model = fit(dev, penalty, objective)
    names = dev[0]["names"]
    weights = dict(zip(names, model[2].round(3).tolist(), strict=True))
    lines = [
        f"dev: {len(dev)} pools; 5-fold CV of (BLEU + F1)/2 by objective and L2 penalty: "
        + ", ".join(f"{o} {k:g}: {v:.2f}" for (o, k), v in cv.items())
        + f"; least KL {rule:.2f}; chosen {objective} {penalty:g} "
        + ("(beats least KL on dev)" if learned_wins else "(does not beat least KL on dev)"),
        "weights (standardised features): "
        + ", ".join(f"{k} {v:+.2f}" for k, v in weights.items()),
        "",
        "| set | least KL (BLEU / F1) | learned judge | learned - least KL (BLEU) | (F1) "
        "| learned - extraction (BLEU) | (F1) | pool's best (BLEU) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    extraction = extraction_row(test_results)
    sets: dict[str, dict] = {}
    examples = []
    for name in dict.fromkeys(p["example"]["set"] for p in test):
        rows = [p for p in test if p["example"]["set"] == name]
        kl = [least_kl(p) for p in rows]
        learned = [choose(p, model) for p in rows]
        refs = [p["example"]["hidden"] for p in rows]
        ext = [p["example"][extraction] for p in rows]
        got = {
            "least KL": [p["cands"][j] for p, j in zip(rows, kl, strict=True)],
            "learned judge": [p["cands"][j] for p, j in zip(rows, learned, strict=True)],
            extraction: ext,
        }
        s = sets[name] = {m: score(hyps, refs) for m, hyps in got.items()}
        s["learned - least KL"] = paired_gain(got["learned judge"], got["least KL"], refs)
        s["learned - extraction"] = paired_gain(got["learned judge"], ext, refs)
        s["oracle_bleu"] = float(np.mean([p["bleu"].max() for p in rows]))
        s["n"] = len(rows)
        examples += [
            {"hidden": r, "set": name, **{m: got[m][i] for m in got}} for i, r in enumerate(refs)
        ]
        lines.append(
            f"| {name} | {s['least KL']['bleu']['mean']:.1f} / "
            f"{s['least KL']['token_f1']['mean']:.1f} | {s['learned judge']['bleu']['mean']:.1f} / "
            f"{s['learned judge']['token_f1']['mean']:.1f} | "
            + " | ".join(
                format_ci(s[f"learned - {w}"][k])
                for w in ("least KL", "extraction")
                for k in ("bleu", "token_f1")
            )
            + f" | {s['oracle_bleu']:.1f} |"
        )
    print("\n".join(lines))
    write_results(
        args.out,
        {
            "command": ["python", *sys.argv],
            "dev": args.dev,
            "test": args.test,
            "dev_pools": len(dev),
            "cv": {f"{o} {k:g}": v for (o, k), v in cv.items()},
            "dev_least_kl": rule,
            "objective": objective,
            "penalty": penalty,
            "learned_beats_least_kl_on_dev": learned_wins,
            "temperature": TEMPERATURE,
            "weights": weights,
            "feature_mean": dict(zip(names, model[0].round(4).tolist(), strict=True)),
            "feature_scale": dict(zip(names, model[1].round(4).tolist(), strict=True)),
            "sets": sets,
            "examples": examples,
        },
    )


if __name__ == "__main__":
    main()
