"""Defense sweep: leakage (inversion quality) against utility cost, per defense and strength.

For each defense spec: the clean inverter on defended test vectors (a naive attacker), the
clean inverter fine-tuned on defended training vectors for a fixed budget (an adaptive
attacker), and what the defense costs the service: KL(defended || clean), total-variation
distance (how often a sample from the defended distribution differs from one from the clean
distribution under the best coupling), how often the top token changes, and how the target's
sampled replies change (the target generates with the defense applied at every step, with the
same random draws as a clean run: BLEU of the defended reply against the clean one). Defenses
are functions of the distribution, so they are applied to the clean vectors in the stores; the
target runs only for the sampled replies.
"""

from __future__ import annotations

import html
import io
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..cache import atomic_open
from ..data.store import DistributionStore
from ..errors import Logit2PromptError
from ..evaluation.metrics import score
from ..models.inverter import Inverter
from ..training.trainer import TrainConfig, Trainer
from .chain import parse_defense, sampleable

logger = logging.getLogger(__name__)

DEFAULT_SPECS = (
    "temperature:1.5",
    "temperature:3",
    "topp:0.9",
    "topp:0.5",
    "topk:50",
    "topk:5",
    "expose:20",
    "expose:5",
    "noise:gauss:1",
    "noise:gauss:3",
    "noise:laplace:1",
    "noise:laplace:3",
    "round:1",
    "round:0",
)
REPLY_TOKENS = 24  # tokens of each sampled reply compared
RESULTS_FORMAT = 2  # 2: hidden entries stay hidden through chains; mixed chains cost as served


@dataclass
class SweepConfig:
    checkpoint: str = field(metadata={"help": "an inverter trained on clean data"})
    train_data: str = field(metadata={"help": "clean training store (adaptive attacker)"})
    test_data: str = field(metadata={"help": "clean test store"})
    out: str = field(metadata={"help": "output directory"})
    specs: tuple[str, ...] = field(
        default=DEFAULT_SPECS,
        metadata={
            "help": 'defense specs separated by ";" (default: a grid of every defense)',
            "sep": ";",
        },
    )
    finetune_steps: int = field(
        default=60, metadata={"help": "the adaptive attacker's fine-tuning steps per defense"}
    )
    finetune_lr: float = field(
        default=3e-4, metadata={"help": "the adaptive attacker's learning rate"}
    )
    test_limit: int = field(default=128, metadata={"help": "test prompts scored"})
    batch_size: int = field(
        default=32, metadata={"help": "vectors per batch (inversion, fine-tuning, the target)"}
    )
    # must match any Trainer already made in this process
    mixed_precision: str = field(
        default="auto", metadata={"help": "fine-tuning precision: no, fp16, bf16 or auto"}
    )
    reply_prompts: int = field(
        default=32, metadata={"help": "prompts whose sampled replies are compared (0: skip)"}
    )
    semantic: bool = field(
        default=True, metadata={"help": "MiniLM cosine beside BLEU / token F1 / exact"}
    )


def utility_cost(clean: torch.Tensor, defended: torch.Tensor, display_only: bool) -> dict:
    """Mean KL(defended || clean), total variation and top-1 change over rows `[n, vocab]`."""
    if display_only:  # the service still samples from the clean distribution
        return {"kl": 0.0, "tv": 0.0, "top1_changed": 0.0}
    q = torch.log_softmax(sampleable(defended), dim=-1)
    p = clean
    q_prob = q.exp()
    kl = torch.where(q_prob > 0, q_prob * (q - p), torch.zeros_like(q)).sum(-1)
    tv = 0.5 * (q_prob - p.exp()).abs().sum(-1)
    top1 = (q.argmax(-1) != p.argmax(-1)).float()
    return {"kl": kl.mean().item(), "tv": tv.mean().item(), "top1_changed": top1.mean().item()}


def reply_change(target, prompts: list[str], chain, clean_replies: list[str] | None = None):
    """Sampled replies under the defense vs clean ones drawn with the same random numbers:
    mean BLEU of defended against clean, and the fraction that differ at all."""
    from ..evaluation.metrics import sentence_bleu
    from .chain import DefenseLogitsProcessor

    texts = [target.render(p) for p in prompts]
    clean = clean_replies or target.complete(texts, REPLY_TOKENS, sample=True)
    defended = target.complete(
        texts, REPLY_TOKENS, sample=True, logits_processor=[DefenseLogitsProcessor(chain)]
    )
    return {
        "reply_bleu": float(
            np.mean([sentence_bleu(d, c) for d, c in zip(defended, clean, strict=True)])
        ),
        "reply_changed": float(np.mean([d != c for d, c in zip(defended, clean, strict=True)])),
    }, clean


def _quality(predictions: list[str], references: list[str], semantic: bool = True) -> dict:
    s = score(predictions, references)
    out = {k: s[k]["mean"] for k in ("bleu", "token_f1", "exact")}
    if semantic:
        from ..evaluation.similarity import cosine_similarity

        out["cosine"] = float(np.mean(cosine_similarity(predictions, references)))
    return out


def run_sweep(cfg: SweepConfig, progress: bool = True) -> dict:
    """Run every spec; write results.json, leakage_vs_utility.png and report.html to cfg.out."""
    from ..attacks.invert import ensure_same_target

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    inverter = Inverter.from_pretrained(cfg.checkpoint)
    test = DistributionStore(cfg.test_data)
    for store in (test, DistributionStore(cfg.train_data)):
        if store.fingerprint.defense:  # the sweep applies each defense to clean vectors
            raise Logit2PromptError(
                f"{store.path} was collected under the defense {store.fingerprint.defense!r}; "
                "the sweep needs clean stores"
            )
        ensure_same_target(inverter, store)
    chains = [parse_defense(spec) for spec in cfg.specs]  # a bad spec fails before any work
    if not all(chains):
        raise Logit2PromptError("--specs: 'none' is not a defense (the clean row always runs)")
    config = {**cfg.__dict__, "specs": list(cfg.specs), "results_format": RESULTS_FORMAT}
    done = _finished_rows(out / "results.json", config)
    idx = list(range(min(cfg.test_limit, len(test))))
    refs = [test.prompts[i] for i in idx]
    clean = torch.from_numpy(test.vectors(idx))  # [n, steps, vocab]
    target, clean_replies = None, None
    reply_refs = refs[: cfg.reply_prompts]
    if cfg.reply_prompts:
        from ..attacks.invert import target_from_fingerprint

        target = target_from_fingerprint(test.fingerprint, batch_size=cfg.batch_size)
    unchanged = {"reply_bleu": 100.0, "reply_changed": 0.0} if target else {}
    rows = done[:1] or [
        {
            "spec": "none",
            "kind": "none",
            "utility": {"kl": 0.0, "tv": 0.0, "top1_changed": 0.0, **unchanged},
            "naive": _quality(
                inverter.invert(clean, batch_size=cfg.batch_size), refs, cfg.semantic
            ),
        }
    ]
    rows[0]["adaptive"] = rows[0]["naive"]
    for chain in chains:
        finished = next((r for r in done[1:] if r["spec"] == chain.spec), None)
        if finished is not None:  # a rerun of a killed sweep keeps what it had finished
            rows.append(finished)
            continue
        kind = chain.defenses[0].kind
        defended = chain.apply(clean)
        # What the service samples: display-only defenses (expose, round) leave it clean.
        served = chain.served
        display_only = not served
        row = {
            "spec": chain.spec,
            "kind": kind,
            "utility": utility_cost(clean[:, 0], served.apply(clean[:, 0]), display_only),
            "privacy": [d.privacy() for d in chain.defenses if d.privacy()],
            "naive": _quality(
                inverter.invert(defended, batch_size=cfg.batch_size), refs, cfg.semantic
            ),
        }
        if target is not None and display_only:
            row["utility"].update(unchanged)  # the service still samples the clean distribution
        elif target is not None:
            change, clean_replies = reply_change(target, reply_refs, served, clean_replies)
            row["utility"].update(change)
        tune_dir = out / "adaptive" / chain.spec.replace(":", "_").replace(",", "+")
        if tune_dir.exists():
            shutil.rmtree(tune_dir)
        tuned = Trainer(
            TrainConfig(
                data=cfg.train_data,
                out=str(tune_dir),
                init_from=cfg.checkpoint,
                defense=chain.spec,
                max_steps=cfg.finetune_steps,
                lr=cfg.finetune_lr,
                warmup_steps=0,
                schedule="constant",
                save_every=10**9,
                progress=progress,
                per_device_batch_size=cfg.batch_size,
                mixed_precision=cfg.mixed_precision,
            )
        ).run()
        row["adaptive"] = _quality(
            tuned.invert(defended, batch_size=cfg.batch_size), refs, cfg.semantic
        )
        rows.append(row)
        _write_results(out / "results.json", config, refs, rows, complete=False)
        logger.info(
            "%-18s KL %.3f  naive BLEU %.1f  adaptive BLEU %.1f",
            chain.spec,
            row["utility"]["kl"],
            row["naive"]["bleu"],
            row["adaptive"]["bleu"],
        )
    results = _write_results(out / "results.json", config, refs, rows, complete=True)
    png = plot(rows, out / "leakage_vs_utility.png")
    (out / "report.html").write_text(report_html(results, png), encoding="utf-8")
    return results


def _write_results(path: Path, config: dict, refs: list[str], rows: list[dict], complete: bool):
    results = {"config": config, "n_test": len(refs), "rows": rows, "complete": complete}
    with atomic_open(path) as f:
        f.write(json.dumps(results, indent=1))
    return results


def _finished_rows(path: Path, config: dict) -> list[dict]:
    """The rows a killed run of this very sweep wrote (clean row first), else none: a
    finished sweep, another sweep, or one of an older results format runs again whole."""
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if earlier.get("complete") is not False or earlier.get("config") != json.loads(
        json.dumps(config)
    ):
        return []
    rows = earlier.get("rows") or []
    if rows and rows[0].get("spec") == "none":
        logger.info("%s: reusing %d finished rows of this sweep", path, len(rows) - 1)
        return rows
    return []


def plot(rows: list[dict], path: Path) -> bytes:
    """Leakage (BLEU) against utility cost (total variation), one curve per defense kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    kinds = sorted({r["kind"] for r in rows if r["kind"] != "none"})
    base = next(r for r in rows if r["kind"] == "none")
    for kind in kinds:
        pts = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["utility"]["tv"])
        xs = [0.0] + [r["utility"]["tv"] for r in pts]
        for attacker, style in (("adaptive", "-o"), ("naive", ":x")):
            ys = [base[attacker]["bleu"]] + [r[attacker]["bleu"] for r in pts]
            ax.plot(xs, ys, style, label=f"{kind} ({attacker})")
    ax.set_xlabel("utility cost: total variation from the clean distribution")
    ax.set_ylabel("leakage: inversion BLEU")
    ax.set_title("Leakage vs utility cost per defense (lower-left is better for the provider)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def report_html(results: dict, png: bytes) -> str:
    """A self-contained HTML page: the plot (inline PNG) and the table."""
    head = (
        "<tr><th>defense</th><th>KL(def||clean)</th><th>TV</th><th>top-1 changed</th>"
        "<th>sampled reply BLEU vs clean</th><th>naive BLEU</th><th>naive F1</th>"
        "<th>adaptive BLEU</th><th>adaptive F1</th><th>adaptive exact %</th>"
        "<th>adaptive cosine</th></tr>"
    )
    body = []
    for r in results["rows"]:
        u, n, a = r["utility"], r["naive"], r["adaptive"]
        reply = f"{u['reply_bleu']:.1f}" if "reply_bleu" in u else "-"
        cos = f"{a['cosine']:.3f}" if "cosine" in a else "-"
        body.append(
            f"<tr><td>{html.escape(r['spec'])}</td><td>{u['kl']:.3f}</td><td>{u['tv']:.3f}</td>"
            f"<td>{100 * u['top1_changed']:.1f}%</td><td>{reply}</td><td>{n['bleu']:.1f}</td>"
            f"<td>{n['token_f1']:.1f}</td><td>{a['bleu']:.1f}</td><td>{a['token_f1']:.1f}</td>"
            f"<td>{a['exact']:.1f}</td><td>{cos}</td></tr>"
        )
    from ..evaluation.report import page, png_tag

    body = (
        f"<p>{results['n_test']} test prompts; adaptive attacker: the clean inverter fine-tuned "
        f"for {results['config']['finetune_steps']} steps on defended training vectors.</p>"
        f"{png_tag(png, 'leakage vs utility')}<table>{head}{''.join(body)}</table>"
    )
    return page("Defense sweep", body)


def best_tradeoff(rows: list[dict]) -> dict | None:
    """The sampling-affecting defense with the largest drop in adaptive BLEU per unit of TV."""
    base = next(r for r in rows if r["kind"] == "none")["adaptive"]["bleu"]
    scored = [
        (base - r["adaptive"]["bleu"]) / r["utility"]["tv"]
        for r in rows
        if r["kind"] != "none" and r["utility"]["tv"] > 0
    ]
    candidates = [r for r in rows if r["kind"] != "none" and r["utility"]["tv"] > 0]
    if not candidates:
        return None
    return candidates[int(np.argmax(scored))]
