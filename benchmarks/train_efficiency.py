"""Training efficiency: validation loss against training time, today's recipe vs the new default.

    python benchmarks/train_efficiency.py --train runs/eff/train --val runs/steps/validation \
        --test runs/steps/test --ood runs/steps/chatterbot_first_turns ... --minutes 40

Recipes of the retrieval-augmented prefix-lm (2 neighbours) on the same training store:
`today` (the settings of the quality runs: every decoder weight trained at 1e-4, batch 16, no
length bucketing), `lora-b16` (the previous default: LoRA + bucketing, batch 16) and `new`
(`train`'s defaults as they are now: the same at batch 4). Each trains for `--minutes` of
training-step time on this machine's threads (validation not counted), its cosine schedule
calibrated to end there, validating every ~tenth of the budget. Per recipe, a probe process
times and counts the FLOPs of the run's first batches (`torch.utils.flop_counter`, forward +
backward) and measures this machine's matmul peak at the model's shapes (fp32 and bf16), hence
the fraction of the peak the step uses; the training runs in a process of its own, which
reports its peak RSS.

Then: the minutes each recipe needs to reach `today`'s final validation loss (interpolated
between validations) and the ratio to `today`'s budget; each model's greedy BLEU / token F1 /
exact on a seeded sample of `--test-limit` test prompts and on every prompt of each OOD store,
with 95% CIs and the paired gain over `today`. Candidate recipes (CANDIDATES) are screened on a
shorter budget against a finished `today` run:

    python benchmarks/train_efficiency.py ... --work runs/eff13 --minutes 13.3 \
        --recipes b4 --reference runs/eff/today --no-score --out .../train_efficiency-screen.json

Writes benchmarks/results/train_efficiency.json; trained runs under `--work` are reused.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from logit2prompt.attacks.invert import target_from_fingerprint
from logit2prompt.data.store import DistributionStore
from logit2prompt.evaluation.metrics import paired_gain, score
from logit2prompt.evaluation.results import write_results
from logit2prompt.models.inverter import Inverter
from logit2prompt.training.config import TrainConfig
from logit2prompt.training.trainer import Trainer

RESULTS = Path(__file__).parent / "results" / "train_efficiency.json"
# The probe times the run's first steps: at least this many examples (5 steps of 16, 12 of
# 4), since bucketed batches vary in length.
CALIBRATION_EXAMPLES = 48

# The recipe of the quality runs before this benchmark (benchmarks/quality.py, quickstart).
TODAY = dict(
    preset="prefix-lm",
    neighbours=2,
    per_device_batch_size=16,
    lr=1e-3,
    decoder_lr=1e-4,
    lora_rank=0,
    bucket_lengths=False,
)
# The previous default (LoRA adapters on a frozen decoder, length bucketing) at today's batch.
LORA_B16 = dict(preset="prefix-lm", neighbours=2, per_device_batch_size=16)
# `train`'s defaults now: LoRA + bucketing at the prefix-lm's default batch of 4.
NEW = dict(preset="prefix-lm", neighbours=2)
# Candidates screened against `today` (run with a shorter --minutes and --reference): at ~13 s
# per step of 16, a 40-minute run takes only ~180 optimizer steps, so smaller batches buy
# more updates per example seen.
CANDIDATES = {
    "b4": dict(LORA_B16, per_device_batch_size=4),
    "b8": dict(LORA_B16, per_device_batch_size=8),
    "b4-lr2e-3": dict(LORA_B16, per_device_batch_size=4, lr=2e-3),
    # Neighbours cut to their first 16 tokens: ~26% fewer decoder tokens per example on
    # BIG-bench (prompts average 27 tokens, two neighbours each).
    "b4-n16": dict(LORA_B16, per_device_batch_size=4, overrides={"neighbour_length": 16}),
    # Neighbours' keys and values computed without gradients: a forward pass per neighbour
    # token instead of forward + backward.
    "b4-detach": dict(LORA_B16, per_device_batch_size=4, overrides={"detach_neighbours": True}),
}
RECIPES = {"today": TODAY, "lora-b16": LORA_B16, "new": NEW, **CANDIDATES}
# Shapes of the decoder's big matmuls (SmolLM2-135M: hidden 576, MLP 1536) at ~3200 tokens.
PEAK_SHAPES = [(3200, 576, 1536), (3200, 1536, 576), (3200, 576, 576)]


def matmul_peak(dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Best TFLOP/s of [m, k] @ [k, n] over PEAK_SHAPES on this machine's threads."""
    best = 0.0
    for m, k, n in PEAK_SHAPES:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        a @ b  # warm-up
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / len(PEAK_SHAPES):
            a @ b
            reps += 1
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e12)
    return best


def config(args, recipe: str) -> TrainConfig:
    fields = {k: v for k, v in RECIPES[recipe].items() if k in TrainConfig.__dataclass_fields__}
    return TrainConfig(
        data=args.train,
        val_data=args.val,
        out=str(Path(args.work) / recipe),
        progress=False,
        seed=args.seed,
        **fields,
    )


def probe(args, recipe: str) -> None:
    """In its own process (so the training run's peak RSS is its own): seconds per step and
    FLOPs per example on the run's first batches (CALIBRATION_EXAMPLES), and the matmul peak."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = config(args, recipe)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(
        TrainConfig(**{**asdict(cfg), "out": str(out / "calibrate"), "val_data": None})
    )
    trainer.prepare()
    trainer.train_step()  # warm-up
    count = max(5, -(-CALIBRATION_EXAMPLES // (trainer.global_micro * cfg.grad_accum)))
    steps = range(1, count + 1)
    t0 = time.perf_counter()
    for step in steps:
        trainer.step = step  # the run's own batches: bucketed batches differ in length
        trainer.train_step()
    step_s = (time.perf_counter() - t0) / count
    with FlopCounterMode(display=False) as counter:
        for step in steps:
            trainer.step = step
            trainer.train_step()
    examples = trainer.global_micro * cfg.grad_accum * count
    (out / "probe.json").write_text(
        json.dumps(
            {
                "calibrated_s_per_step": step_s,
                "flops_per_example": counter.get_total_flops() / examples,
                "matmul_peak_tflops": {
                    "fp32": matmul_peak(torch.float32),
                    "bf16": matmul_peak(torch.bfloat16),
                },
            },
            indent=1,
        )
    )


def train_child(args, recipe: str) -> None:
    """Train for the calibrated number of steps; write the process's peak RSS."""
    cfg = config(args, recipe)
    out = Path(cfg.out)
    step_s = json.loads((out / "probe.json").read_text())["calibrated_s_per_step"]
    cfg.max_steps = max(20, int(args.minutes * 60 / step_s))
    cfg.max_minutes = args.minutes
    cfg.eval_every = max(cfg.max_steps // args.evaluations, 1)
    cfg.save_every = cfg.eval_every
    cfg.warmup_steps = min(500, cfg.max_steps // 20)
    print(f"{recipe}: {step_s:.2f} s/step -> {cfg.max_steps} steps", flush=True)
    Trainer(cfg).run(resume=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (out / "bench.json").write_text(json.dumps({"peak_rss_mb": rss}, indent=1))


def minutes_to_reach(history: list[dict], loss: float) -> float | None:
    """Training minutes at which the validation loss first falls to `loss` (linear between
    validations), None if it never does."""
    prev = (0.0, float("inf"))
    for h in history:
        t, v = h["train_minutes"], h["val_loss"]
        if v <= loss:
            if not np.isfinite(prev[1]):
                return t
            return prev[0] + (t - prev[0]) * (prev[1] - loss) / (prev[1] - v)
        prev = (t, v)
    return None


def summary(out: Path) -> dict:
    info = json.loads((out / "training_args.json").read_text())
    bench = {
        **json.loads((out / "probe.json").read_text()),
        **json.loads((out / "bench.json").read_text()),
    }
    history = info["history"]
    last = max((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((last / "trainer_state.json").read_text())
    minutes = state["train_seconds"] / 60
    examples = state["step"] * state["global_batch"]
    ex_s = examples / state["train_seconds"]
    flops = bench["flops_per_example"]
    peaks = bench["matmul_peak_tflops"]
    return {
        "settings": {k: info[k] for k in ("per_device_batch_size", "lr", "decoder_lr", "max_steps")}
        | {k: info.get(k) for k in ("lora_rank", "bucket_lengths", "overrides")},
        "train_minutes": minutes,
        "steps": history[-1]["step"],
        "examples": examples,
        "examples_per_s": ex_s,
        "gflops_per_example": flops / 1e9,
        "achieved_tflops": flops * ex_s / 1e12,
        "fraction_of_fp32_peak": flops * ex_s / 1e12 / peaks["fp32"],
        "fraction_of_bf16_peak": flops * ex_s / 1e12 / peaks["bf16"],
        "fraction_of_best_peak": flops * ex_s / 1e12 / max(peaks.values()),
        "matmul_peak_tflops": peaks,
        "peak_rss_mb": bench["peak_rss_mb"],
        "final_val_loss": history[-1]["val_loss"],
        "curve": [
            {k: h[k] for k in ("step", "train_minutes", "val_loss", "val_bleu", "val_token_f1")}
            for h in history
        ],
    }


def sample(store: DistributionStore, limit: int | None, seed: int) -> list[int]:
    n = len(store)
    if not limit or limit >= n:
        return list(range(n))
    return sorted(np.random.default_rng(seed).choice(n, limit, replace=False).tolist())


def predictions(model: Inverter, store: DistributionStore, idx: list[int], cache: Path) -> list:
    if cache.is_file():  # reused only for the same prompts (older caches: a bare list)
        saved = json.loads(cache.read_text())
        if isinstance(saved, dict) and saved.get("idx") == list(idx):
            return saved["predictions"]
    preds: list[str] = []
    steps = model.config.steps
    for i in range(0, len(idx), 32):
        chunk = idx[i : i + 32]
        x = torch.from_numpy(store.vectors(chunk, steps)).view(len(chunk), steps, -1)
        preds += model.invert(x, batch_size=32)
    cache.write_text(json.dumps({"idx": list(idx), "predictions": preds}))
    return preds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", required=True)
    parser.add_argument("--val", required=True)
    parser.add_argument("--test", required=True)
    parser.add_argument("--ood", nargs="*", default=[])
    parser.add_argument("--minutes", type=float, default=40.0, help="training budget per recipe")
    parser.add_argument("--test-limit", type=int, default=500, help="test prompts scored")
    parser.add_argument(
        "--recipes", nargs="+", default=["today", "lora-b16", "new"], choices=list(RECIPES)
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--evaluations", type=int, default=10, help="validations per run")
    parser.add_argument("--work", default="runs/eff")
    parser.add_argument("--train-only", choices=list(RECIPES), help=argparse.SUPPRESS)
    parser.add_argument("--probe-only", choices=list(RECIPES), help=argparse.SUPPRESS)
    parser.add_argument(
        "--reference", help="run directory of `today` at its full budget (default: WORK/today)"
    )
    parser.add_argument("--no-score", action="store_true", help="curves only, no test scoring")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if args.probe_only:
        return probe(args, args.probe_only)
    if args.train_only:
        return train_child(args, args.train_only)

    for recipe in args.recipes:
        out = Path(args.work) / recipe
        for step, done in (("probe", "probe.json"), ("train", "bench.json")):
            if not (out / done).is_file():
                cmd = [sys.executable, __file__, *sys.argv[1:], f"--{step}-only", recipe]
                subprocess.run(cmd, check=True)
    results: dict = {"minutes": args.minutes, "recipes": {}, "scores": {}, "reach": {}}
    for recipe in args.recipes:
        results["recipes"][recipe] = summary(Path(args.work) / recipe)
    # The bar: `today`'s final validation loss after its full budget (from --reference when
    # this invocation screens candidates on a shorter budget).
    reference = Path(args.reference) if args.reference else Path(args.work) / "today"
    if (reference / "bench.json").is_file():
        old = summary(reference)
        for recipe, run in results["recipes"].items():
            if recipe == "today":
                continue
            reach = minutes_to_reach(run["curve"], old["final_val_loss"])
            results["reach"][recipe] = {
                "today_val_loss": old["final_val_loss"],
                "today_minutes": old["train_minutes"],
                "minutes": reach,
                "ratio": None if reach is None else reach / old["train_minutes"],
            }
    write_results(args.out, results, command=["python", *sys.argv])
    if args.no_score:
        print(table(results))
        return

    sets = {"bigbench test": (DistributionStore(args.test), args.test_limit)}
    for path in args.ood:
        sets[Path(path).name] = (DistributionStore(path), None)
    target = target_from_fingerprint(sets["bigbench test"][0].fingerprint, batch_size=16)
    for name, (store, limit) in sets.items():
        store.attach(target)
        idx = sample(store, limit, args.seed)
        refs = [store.prompts[i] for i in idx]
        preds = {}
        for recipe in args.recipes:
            out = Path(args.work) / recipe
            model = Inverter.from_pretrained(out)
            slug = name.replace(" ", "_")
            preds[recipe] = predictions(model, store, idx, out / f"predictions-{slug}.json")
            row = {"prompts": len(idx), **score(preds[recipe], refs)}
            if recipe != "today" and "today" in preds:
                row["gain_over_today"] = paired_gain(preds[recipe], preds["today"], refs)
            pairs = zip(refs[:3], preds[recipe][:3], strict=True)
            row["examples"] = [{"hidden": h, "recovered": p} for h, p in pairs]
            results["scores"].setdefault(name, {})[recipe] = row
            write_results(args.out, results, command=["python", *sys.argv])
    print(table(results))


def table(results: dict) -> str:
    lines = [
        "| recipe | ex/s | GFLOP/ex | TFLOP/s | of the best matmul peak | peak RSS MB "
        "| val loss at end |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results["recipes"].items():
        lines.append(
            f"| {name} | {r['examples_per_s']:.2f} | {r['gflops_per_example']:.0f} | "
            f"{r['achieved_tflops']:.3f} | {r['fraction_of_best_peak']:.0%} | "
            f"{r['peak_rss_mb']:.0f} | {r['final_val_loss']:.3f} |"
        )
    for name, reach in results.get("reach", {}).items():
        lines.append(f"\n{name} reaches today's final val loss: {reach}")
    for name, rows in results["scores"].items():
        for recipe, row in rows.items():
            lines.append(
                f"{name:<24} {recipe:<6} BLEU {row['bleu']['mean']:5.1f} "
                f"F1 {row['token_f1']['mean']:5.1f} exact {row['exact']['mean']:4.1f}%"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
