"""What the training corpus buys out of domain: inverters trained on different corpora, scored
on the same in-domain and out-of-domain stores, with paired gains over the first run.

    python benchmarks/corpus_ood.py --runs bigbench=runs/eff/new mix=runs/mix/inv \
        --sets bigbench=runs/steps/test:500 mix=runs/mix/test \
               chatterbot=runs/steps/chatterbot_first_turns ...

Each run is a trained checkpoint (same recipe and budget, different `--data`); each set is a
store of held-out prompts (`NAME=STORE[:LIMIT]`, a seeded sample of LIMIT prompts). Greedy
inversion of every prompt by every run; BLEU / token F1 / exact with 95% bootstrap CIs, and per
run after the first its paired gain over the first. `--extraction STRING` also asks the target
itself with that attack string (the hidden prompt placed by the store's mode, greedy 64-token
reply) on the same prompts, and reports each run's paired gain over it. Predictions are cached
in each run's directory (extraction replies under --work), per set and prompt list. Writes
benchmarks/results/corpus_ood.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

# The same seeded draw of test prompts as train_efficiency.py, whose caches are reused here.
from train_efficiency import sample

from logit2prompt.attacks.invert import target_from_fingerprint
from logit2prompt.data.store import DistributionStore
from logit2prompt.evaluation.metrics import paired_gain, score
from logit2prompt.evaluation.results import write_results
from logit2prompt.models.inverter import Inverter

RESULTS = Path(__file__).parent / "results" / "corpus_ood.json"
EXTRACTION = "extraction"
BATCH = 32


def _pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"{what} takes NAME=VALUE, got {item!r}")
        out[name] = value
    return out


def predictions(model: Inverter, store: DistributionStore, idx: list[int], cache: Path) -> list:
    """Greedy inversions, reused from `cache` only for the very same hidden prompts."""
    key = hashlib.sha256(json.dumps([store.prompts[i] for i in idx]).encode()).hexdigest()
    if cache.is_file():
        saved = json.loads(cache.read_text())
        # train_efficiency.py's caches (same greedy decode) name the store rows instead.
        if saved.get("prompts_sha256") == key or saved.get("idx") == idx:
            return saved["predictions"]
    preds: list[str] = []
    steps = model.config.steps
    for start in range(0, len(idx), BATCH):
        chunk = idx[start : start + BATCH]
        x = torch.from_numpy(store.observations(chunk, steps, model.token_subset))
        preds += model.invert(x, batch_size=BATCH)
    cache.write_text(json.dumps({"prompts_sha256": key, "predictions": preds}))
    return preds


def extraction(target, refs: list[str], attack: str, work: Path, set_name: str) -> list[str]:
    """The target's greedy replies to `attack` with each hidden prompt in place (cached)."""
    from logit2prompt.attacks.extraction import attack_input

    key = hashlib.sha256(json.dumps([attack, refs]).encode()).hexdigest()
    cache = work / f"extraction-{set_name}.json"
    if cache.is_file() and json.loads(cache.read_text()).get("key") == key:
        return json.loads(cache.read_text())["replies"]
    replies = target.complete([attack_input(target, p, attack) for p in refs], 64)
    work.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "replies": replies}))
    return replies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="NAME=CHECKPOINT ...")
    parser.add_argument("--sets", nargs="+", required=True, help="NAME=STORE[:LIMIT] ...")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extraction", default=None, help="an extraction attack string")
    parser.add_argument("--work", default="runs/corpus_ood", help="extraction reply cache")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    runs = {name: Path(path) for name, path in _pairs(args.runs, "--runs").items()}
    sets = {}
    for name, spec in _pairs(args.sets, "--sets").items():
        path, _, limit = spec.partition(":")
        sets[name] = (DistributionStore(path), int(limit) if limit else None)

    results: dict = {"runs": {}, "scores": {}}
    for name, path in runs.items():
        training = json.loads((path / "training_args.json").read_text())
        history = training.get("history") or [{}]
        results["runs"][name] = {
            "data": training.get("data"),
            "train_minutes": history[-1].get("train_minutes"),
            "steps": history[-1].get("step"),
            "final_val_loss": history[-1].get("val_loss"),
        }
    first_store = next(iter(sets.values()))[0]
    target = target_from_fingerprint(first_store.fingerprint, batch_size=16)
    models = {name: Inverter.from_pretrained(path) for name, path in runs.items()}
    first = next(iter(runs))
    for set_name, (store, limit) in sets.items():
        store.attach(target)
        idx = sample(store, limit, args.seed)
        refs = [store.prompts[i] for i in idx]
        preds = {}
        if args.extraction:
            preds[EXTRACTION] = extraction(target, refs, args.extraction, Path(args.work), set_name)
            row = {"prompts": len(idx), "attack": args.extraction, **score(preds[EXTRACTION], refs)}
            results["scores"].setdefault(set_name, {})[EXTRACTION] = row
        for name, model in models.items():
            cache = runs[name] / f"predictions-{set_name}.json"
            preds[name] = predictions(model, store, idx, cache)
            row = {"prompts": len(idx), **score(preds[name], refs)}
            if name != first:
                row[f"gain_over_{first}"] = paired_gain(preds[name], preds[first], refs)
            if args.extraction:
                row["gain_over_extraction"] = paired_gain(preds[name], preds[EXTRACTION], refs)
            row["examples"] = [
                {"hidden": h, "recovered": p}
                for h, p in zip(refs[:4], preds[name][:4], strict=True)
            ]
            results["scores"].setdefault(set_name, {})[name] = row
            write_results(args.out, results, command=["python", *sys.argv])
            print(
                f"{set_name:14} {name:10} BLEU {row['bleu']['mean']:5.1f} "
                f"F1 {row['token_f1']['mean']:5.1f}",
                flush=True,
            )
    print(table(results, first))


def _gain(row: dict, key: str) -> str:
    gain = row.get(key, {}).get("bleu")
    if not gain:
        return "-"
    return f"{gain['mean']:+.1f} [{gain['ci95'][0]:+.1f}, {gain['ci95'][1]:+.1f}]"


def table(results: dict, first: str) -> str:
    lines = [
        f"| set | method | prompts | BLEU [95% CI] | token F1 | BLEU gain over {first} "
        "(paired) | BLEU gain over extraction (paired) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for set_name, rows in results["scores"].items():
        for name, row in rows.items():
            b, f = row["bleu"], row["token_f1"]
            lines.append(
                f"| {set_name} | {name} | {row['prompts']} | {b['mean']:.1f} "
                f"[{b['ci95'][0]:.1f}, {b['ci95'][1]:.1f}] | {f['mean']:.1f} | "
                f"{_gain(row, f'gain_over_{first}')} | {_gain(row, 'gain_over_extraction')} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
