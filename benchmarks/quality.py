"""Inversion quality on the BIG-bench test split, beside nearest-neighbour and constant baselines.

    python benchmarks/quality.py [--corpus FILE] [--train-prompts N] [--train-minutes M]
                                 [--neighbours 0,2] [--preset P] [--init-from DIR]

Trains on the train split only (split rule of ../shared/data/README.md), picks the number of
steps that fits the time budget from a short calibration run, then scores the whole test split
(no length filter there, so every test prompt counts). One inverter per `--neighbours` value:
0 is the paper's inverter, K > 0 the retrieval-augmented one that also reads the K nearest
training prompts (each gets `--train-minutes`). `--init-from` fine-tunes a trained inverter
instead of starting anew (a prefix-lm learns to read neighbours; its own training time counts
too and is recorded). Each inverter's own output (greedy, or `--num-beams`) is also compared
prompt by prompt with the nearest neighbour (paired gain with 95% CIs), and so is its output
re-ranked by the target (with `--num-beams` its own beams are the candidates, no second decode).
Writes benchmarks/results/quality.json (or `--results`) and each inverter's per-prompt outputs
to `<out>/<inverter>/test_predictions_<decoding>.jsonl` (`rerank_gain.py --proposals` reads them).
Every stage is reused on a rerun (stores resume, a finished inverter is kept).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from logit2prompt.attacks.invert import ensure_same_target
from logit2prompt.attacks.rerank import DEFAULT_BEAMS, DEFAULT_NEIGHBOURS
from logit2prompt.data.bigbench import build_bigbench_corpus
from logit2prompt.data.collect import collect
from logit2prompt.data.corpus import load_corpus
from logit2prompt.data.store import DistributionStore
from logit2prompt.evaluation.metrics import format_table, paired_gain, score
from logit2prompt.evaluation.results import write_results
from logit2prompt.models.inverter import Inverter
from logit2prompt.recipes.methods import NEAREST, MethodContext, run_methods
from logit2prompt.targets import DEFAULT_TARGET, load_target
from logit2prompt.training.trainer import TrainConfig, Trainer, is_trained

RESULTS = Path(__file__).parent / "results" / "quality.json"
SHARED_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "bigbench_prompts.jsonl"
CALIBRATION_STEPS = 8
NO_REPEAT_NGRAM = 3
PAPER = {"bleu": 59.0, "token_f1": 78.0, "exact": 27.0}  # Llama-2 7B, Morris et al. 2023
DECODE_BATCH = 64  # the inverter's own decodes (that of `invert_store`, used before the registry)
TARGET_BATCH = 32


def calibrate(cfg: TrainConfig) -> float:
    """Seconds per training step on this machine, from a short throwaway run."""
    tmp = Path(cfg.out + ".calibrate")
    trainer = Trainer(
        TrainConfig(
            **{
                **cfg.__dict__,
                "out": str(tmp),
                "val_data": None,
                "max_steps": 10**6,
                "progress": False,
            }
        )
    )
    trainer.prepare()
    trainer.train_step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(CALIBRATION_STEPS):
        trainer.train_step()
    shutil.rmtree(tmp, ignore_errors=True)
    return (time.perf_counter() - t0) / CALIBRATION_STEPS


def steps_before(checkpoint: Path) -> int:
    """Training steps that went into a checkpoint, through its chain of --init-from."""
    args = json.loads((checkpoint / "training_args.json").read_text())
    init = args.get("init_from")
    return int(args.get("max_steps", 0)) + (steps_before(Path(init)) if init else 0)


def save_predictions(path: Path, refs: list[str], columns: dict[str, list]) -> None:
    """JSONL, one row per test prompt: the hidden prompt and each method's output."""
    with open(path, "w", encoding="utf-8") as f:
        for i, ref in enumerate(refs):
            row = {"hidden": ref, **{name: col[i] for name, col in columns.items()}}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--corpus",
        default=str(SHARED_CORPUS) if SHARED_CORPUS.is_file() else None,
        help="BIG-bench prompts JSONL (default: ../shared/data file, else built)",
    )
    parser.add_argument("--target", default=DEFAULT_TARGET)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--train-prompts", type=int, default=16000)
    parser.add_argument("--train-minutes", type=float, default=45.0)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--decoder-lr", type=float, default=1e-4, help="preset prefix-lm: the pretrained LM's lr"
    )
    parser.add_argument(
        "--init-from", help="fine-tune this trained inverter (e.g. add --neighbours to a prefix-lm)"
    )
    parser.add_argument(
        "--run-name", help="model directory name under --out (default from --neighbours/--preset)"
    )
    parser.add_argument(
        "--num-beams", type=int, default=1, help="beam search for the inverter's output (1: greedy)"
    )
    parser.add_argument(
        "--skip-no-repeat", action="store_true", help="skip the no-repeat-3-gram decoding pass"
    )
    parser.add_argument(
        "--no-rerank",
        action="store_true",
        help="skip re-ranking beams + neighbours with the target (the slowest stage)",
    )
    parser.add_argument(
        "--neighbours",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[0, 2],
        help="one inverter per value: 0 = the paper's, K = retrieval-augmented with K neighbours",
    )
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="JSON to write (default: %(default)s)"
    )
    args = parser.parse_args()
    if args.run_name and len(args.neighbours) > 1:
        parser.error("--run-name names one inverter; give a single --neighbours value")
    corpus_path = args.corpus or str(build_bigbench_corpus())
    out = Path(args.out)
    started = time.perf_counter()
    target = load_target(args.target, dtype=args.dtype)
    timings = {}
    for split, limit, max_tokens in (
        ("train", args.train_prompts, 64),
        ("validation", 128, 64),
        ("test", None, None),
    ):
        corpus = load_corpus(
            corpus_path,
            count_tokens=target.count_tokens,
            split=split,
            limit=limit,
            max_tokens=max_tokens,
        )
        t0 = time.perf_counter()
        collect(target, corpus, str(out / split), split=split)
        timings[f"collect_{split}_s"] = time.perf_counter() - t0
    train, test = DistributionStore(out / "train"), DistributionStore(out / "test")
    test_vectors = test.vectors(range(len(test)))
    refs = test.prompts
    # One pass over the training store serves the baseline (first column) and every re-ranking.
    t0 = time.perf_counter()
    near = MethodContext(None, test_vectors, train=train).nearest(DEFAULT_NEIGHBOURS)
    timings["nearest_neighbours_s"] = time.perf_counter() - t0
    results, trainings, examples, gains, own, with_queries = {}, {}, {}, {}, {}, {}
    preset = "" if args.preset == "small" else args.preset  # named where it is not the default
    for k in args.neighbours:
        model_dir = out / (
            args.run_name
            or ("inverter" if k == 0 else f"inverter-nn{k}") + (f"-{preset}" if preset else "")
        )
        cfg = TrainConfig(
            data=str(out / "train"),
            val_data=str(out / "validation"),
            out=str(model_dir),
            preset=args.preset,
            lr=args.lr,
            decoder_lr=args.decoder_lr,
            per_device_batch_size=args.batch_size,
            neighbours=k,
            init_from=args.init_from,
        )
        if not is_trained(model_dir):
            step_s = calibrate(cfg)
            cfg.max_steps = max(50, int(args.train_minutes * 60 / step_s))
            cfg.eval_every = max(cfg.max_steps // 8, 1)
            cfg.save_every = max(cfg.max_steps // 10, 1)
            cfg.warmup_steps = min(500, cfg.max_steps // 20)
            print(f"{step_s:.2f} s/step -> {cfg.max_steps} steps in {args.train_minutes} min")
            t0 = time.perf_counter()
            Trainer(cfg).run(resume=True)
            timings[f"train_{model_dir.name}_s"] = time.perf_counter() - t0
        inverter = Inverter.from_pretrained(model_dir)
        training = json.loads((model_dir / "training_args.json").read_text())
        trainings[model_dir.name] = {
            key: training.get(key, 0)
            for key in (
                "preset",
                "max_steps",
                "lr",
                "decoder_lr",
                "per_device_batch_size",
                "mixed_precision",
                "neighbours",
                "init_from",
            )
        }
        history = training.get("history") or [{}]
        trainings[model_dir.name]["final_val_loss"] = history[-1].get("val_loss")
        if args.init_from:  # the compute that went into the starting point counts too
            trainings[model_dir.name]["init_from_steps"] = steps_before(Path(args.init_from))
        copy = ", pointer-generator" if inverter.config.neighbour_copy else ""
        name = (
            "inverter" if k == 0 else f"retrieval-augmented inverter ({k} neighbours{copy})"
        ) + (f" [{preset}]" if preset else "")
        t0 = time.perf_counter()
        beams = args.num_beams
        decoding = "greedy" if beams == 1 else f"{beams} beams"
        ensure_same_target(inverter, test)
        settings = dict(
            target=target,
            train=train,
            num_beams=beams,
            batch_size=TARGET_BATCH,
            decode_batch_size=DECODE_BATCH,
            near=near,
        )
        # Every beam is kept: the best is the inverter's own output, and with --num-beams the
        # re-ranking takes them all as candidates without decoding a second time.
        own_ctx = MethodContext(inverter, test_vectors, **settings, rerank_beams=beams)
        own_ctx.keep_beams = True
        rows = own_ctx.beams()
        decoded = {f"{name} ({decoding})": run_methods(["inverter"], own_ctx)["inverter"]}
        if not args.skip_no_repeat:
            no_repeat = MethodContext(
                inverter, test_vectors, **settings, no_repeat_ngram_size=NO_REPEAT_NGRAM
            )
            decoded[f"{name} ({decoding}, no {NO_REPEAT_NGRAM}-gram repeat)"] = run_methods(
                ["inverter"], no_repeat
            )["inverter"]
        shown = list(decoded.values())[-1]
        timings[f"invert_test_{model_dir.name}_s"] = time.perf_counter() - t0
        results.update({method: score(preds, refs) for method, preds in decoded.items()})
        own.update(decoded)  # the inverter's own output, no target queries
        # Per prompt, so later analyses (and re-rankings) need not decode again.
        predictions = model_dir / f"test_predictions_{decoding.replace(' ', '')}.jsonl"
        save_predictions(predictions, refs, {**decoded, "beams": rows})
        if not args.no_rerank:
            t0 = time.perf_counter()
            if beams > 1:
                method = f"{name}: its {beams} beams + {DEFAULT_NEIGHBOURS} neighbours, re-ranked"
                rerank_ctx = own_ctx  # its beams are the candidates
            else:
                method = f"{name}: beams + {DEFAULT_NEIGHBOURS} neighbours, re-ranked by the target"
                # A decode of its own: DEFAULT_BEAMS beams, no repeated 3-grams, target batches.
                rerank_ctx = MethodContext(
                    inverter,
                    test_vectors,
                    **{**settings, "decode_batch_size": None},
                    no_repeat_ngram_size=NO_REPEAT_NGRAM,
                    rerank_beams=DEFAULT_BEAMS,
                )
            (reranked,) = run_methods(["rerank"], rerank_ctx).values()
            timings[f"rerank_test_{model_dir.name}_s"] = time.perf_counter() - t0
            results[method] = score(reranked, refs)
            with_queries[method] = reranked
            save_predictions(predictions, refs, {**decoded, method: reranked, "beams": rows})
        if inverter.memory is not None:
            # What the memory alone retrieves: the sketch's nearest neighbour.
            sketched = inverter.memory.search(torch.from_numpy(test_vectors).flatten(1), 1)
            results[f"nearest neighbour by the {inverter.memory.dims}-bucket sketch"] = score(
                [inverter.memory.prompts[row[0]] for row in sketched], refs
            )
        examples[name] = [
            {"hidden": r, "recovered": p} for r, p in zip(refs[:20], shown[:20], strict=True)
        ]
    base_ctx = MethodContext(None, test_vectors, train=train, near=near)
    # Row names from the registry (results files before the redesign said "... (train)").
    baselines = run_methods(["nn", "constant"], base_ctx)
    results.update({name: score(preds, refs) for name, preds in baselines.items()})
    for name, preds in {**own, **with_queries}.items():
        # Paired per-prompt differences: whether the inverter beats retrieval, alone and with
        # target queries.
        gains[name] = paired_gain(preds, baselines[NEAREST], refs)
        gains[name]["n"] = {"mean": len(refs)}
    steps = ", ".join(f"{name} {t['max_steps']} steps" for name, t in trainings.items())
    print(
        f"BIG-bench test split ({len(refs)} prompts), target {target.fingerprint.describe()}, "
        f"trained on {len(train)} train prompts ({steps})"
    )
    print(format_table(results))
    print("gain over nearest neighbour, paired per prompt (95% CI):")
    print(format_table(gains))
    print(
        f"paper (Llama-2 7B, T5-base, 2.33M prompts): BLEU {PAPER['bleu']}, token F1 "
        f"{PAPER['token_f1']}, exact {PAPER['exact']}%"
    )
    write_results(
        args.results,
        {
            "benchmark": "quality",
            "corpus": corpus_path,
            "target": target.fingerprint.to_dict(),
            "train_prompts": len(train),
            "test_prompts": len(refs),
            "training": trainings,
            "results": results,
            "gain_over_nearest_neighbour": gains,
            "paper_llama2_7b": PAPER,
            "timings_s": timings,
            "wall_s": time.perf_counter() - started,
            "examples": examples,
        },
        command=["python", *sys.argv],
    )
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
