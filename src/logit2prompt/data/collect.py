"""Collection: run a target over a corpus and write its distributions into a store.

Resumable (finished shards are skipped), and under `accelerate launch` each process takes the
shards k with k % num_processes == process_index, so the result is one store.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import TargetError
from ..targets.base import Target
from .corpus import Corpus
from .store import (
    DEFAULT_SHARD_SIZE,
    DEFAULT_STORE_DTYPE,
    FORMATS,
    FULL,
    StorePlan,
    StoreWriter,
    describe_encoding,
)

logger = logging.getLogger(__name__)

# Greedy steps observed per prompt by default: at one training budget, 4 steps beat 1 on the
# BIG-bench test split (BLEU +3.2, paired 95% CI [2.2, 4.3]) and matched 16, which collects
# 2.2x slower (benchmarks/results/steps.json).
DEFAULT_STEPS = 4


@dataclass
class CollectResult:
    path: str
    num_prompts: int
    prompts_written: int  # by this process in this run (resumed shards excluded)
    shards_written: int
    shards_skipped: int
    seconds: float
    dropped_over_context: int
    encoding: str = "full"

    @property
    def prompts_per_second(self) -> float:
        return self.prompts_written / self.seconds if self.seconds > 0 else 0.0


def drop_over_context(target: Target, corpus: Corpus, steps: int) -> tuple[Corpus, int]:
    """Remove prompts whose templated form would not fit the target's context (counted)."""
    limit = target.max_context
    if limit is None or not hasattr(target, "encode"):
        return corpus, 0
    lengths = [len(x) for x in target.encode(corpus.texts)]
    keep = [r for r, n in zip(corpus.records, lengths, strict=True) if n + steps - 1 <= limit]
    dropped = len(corpus.records) - len(keep)
    return Corpus(keep, corpus.source, {**corpus.dropped, "over_context": dropped}), dropped


def choose_basis(target: Target, fmt: str):
    """The white-box basis a store of `target` is written in for `--format fmt`: the
    target's output layer for compact and auto, where it has one; None otherwise (full, or
    a basis to fit: see `fit_basis`). A defended target has none: its vectors leave the
    subspace, so they are stored full."""
    if fmt not in FORMATS:
        raise TargetError(f"unknown store format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt in ("full", "subset"):
        return None
    if target.fingerprint.defense:
        if fmt == "compact":
            raise TargetError(
                f"{target.fingerprint.describe()} has no lossless compact form: a defense "
                f"({target.fingerprint.defense}) moves its vectors off the model's subspace; "
                "use --format full"
            )
        return None
    get = getattr(target, "output_basis", None)
    return get() if get is not None else None


CALIBRATION_VECTORS = 2048  # prompt-steps a fitted basis is fitted and checked on


def fit_basis(target: Target, corpus: Corpus, out: str, steps: int, fmt: str, batch_size: int):
    """A basis fitted from full vectors of the corpus's first prompts (targets without
    weights), or the one a store being resumed already has; None when no lossless one fits
    (`--format auto` then stores full vectors, `compact` is refused)."""
    from ..targets.basis import FittedBasis
    from .store import MANIFEST, read_manifest

    if (Path(out) / MANIFEST).is_file():
        encoding = read_manifest(out)["encoding"]
        if encoding.get("kind") != "fitted":
            return None  # the store's own format decides; the writer checks it
        return FittedBasis.load(out)
    n = min(len(corpus), -(-CALIBRATION_VECTORS // steps))
    texts = [r.text for r in corpus.records[:n]]
    vectors = collect_vectors(target, texts, steps, batch_size)
    basis, report = FittedBasis.fit(vectors.reshape(-1, vectors.shape[-1]))
    logger.info("fitted basis from %d prompts: %s", n, report)
    if basis is None and fmt == "compact":
        raise TargetError(
            f"no lossless basis fits {target.fingerprint.describe()} ({report.get('reason')}); "
            "use --format full"
        )
    return basis


def _earlier_report(out: str) -> dict:
    """The collection report of a store being rerun, if it has one."""
    from .store import MANIFEST, read_manifest

    return read_manifest(out).get("collection", {}) if (Path(out) / MANIFEST).is_file() else {}


def store_subset(target: Target, out: str, size: int | None, seed: int):
    """The token subset a `--format subset` store observes: the one a store being resumed
    records, else `size` tokens (default: the hidden size + SUBSET_MARGIN, read off a
    white-box target's output layer) drawn with `seed`."""
    from ..targets.subset import TokenSubset, default_subset_size
    from .store import MANIFEST, read_manifest

    if (Path(out) / MANIFEST).is_file():
        encoding = read_manifest(out)["encoding"]
        if encoding.get("kind") == "subset":
            return TokenSubset.from_encoding(encoding)
    if target.fingerprint.defense:
        raise TargetError(
            f"{target.fingerprint.describe()} has a defense ({target.fingerprint.defense}), "
            "which moves its vectors off the model's subspace: a token subset would not "
            "determine them; use --format full"
        )
    if size is None:
        basis = getattr(target, "output_basis", lambda: None)()
        if basis is None:
            raise TargetError(
                "--format subset needs --subset-size for a target without weights (the "
                "hidden size + 100; `logit2prompt probe-api` estimates the hidden size)"
            )
        size = default_subset_size(basis.width)
    return TokenSubset.choose(target.tokenizer, target.vocab_size, size, seed)


def observe(target: Target, texts: list[str], steps: int, batch_size: int, subset) -> np.ndarray:
    """Subset observations `[n, steps, |S|]`: an API target asks for S alone, a white-box
    one computes them from its hidden states (or full vectors)."""
    from ..targets.subset import observe_coordinates

    ask = getattr(target, "observe_subset", None)
    if ask is not None:
        return ask(texts, subset, steps=steps)
    basis = getattr(target, "output_basis", lambda: None)()
    if basis is not None and hasattr(target, "forward_ids"):
        coords = collect_vectors(target, texts, steps, batch_size, compact=True)
        return observe_coordinates(basis, coords, subset)
    return subset.observe(collect_vectors(target, texts, steps, batch_size))


def collect(
    target: Target,
    corpus: Corpus,
    out: str,
    *,
    split: str = "all",
    steps: int | None = None,
    fmt: str = "auto",
    subset_size: int | None = None,
    subset_seed: int = 0,
    store_dtype: str | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    batch_size: int = 32,
    process_index: int = 0,
    num_processes: int = 1,
    wait_for_everyone=None,
    progress: bool = True,
) -> CollectResult:
    """Collect `corpus` into the store at `out`; returns counts and timing of this run.

    `steps`: greedy steps observed per prompt (default DEFAULT_STEPS, or fewer where the
    target observes fewer, as API targets do)."""
    if steps is None:
        limit = target.max_steps
        steps = DEFAULT_STEPS if limit is None else min(DEFAULT_STEPS, limit)
    if steps < 1:
        raise TargetError(f"--steps must be >= 1, got {steps}")
    # A float16 store asked for by name is a full one (coordinates need float32).
    fmt = "full" if fmt == "auto" and store_dtype == "float16" else fmt
    basis = choose_basis(target, fmt)
    subset = store_subset(target, out, subset_size, subset_seed) if fmt == "subset" else None
    # A target without weights gets a basis fitted by the main process (see fit_basis).
    fitted = basis is None and fmt not in ("full", "subset") and not target.fingerprint.defense
    corpus, over_context = drop_over_context(target, corpus, steps)
    if fitted and process_index == 0:
        basis = fit_basis(target, corpus, out, steps, fmt, batch_size)
    if (basis is not None or subset is not None) and store_dtype not in (None, "float32"):
        raise TargetError(
            f"a compact store keeps float32 coordinates (float16 would lose ~1e-2 nats); "
            f"drop --store-dtype {store_dtype} or use --format full"
        )

    def plan_for(basis) -> StorePlan:
        return StorePlan(
            fingerprint=target.fingerprint,
            encoding=(
                subset.encoding()
                if subset is not None
                else basis.encoding()
                if basis is not None
                else dict(FULL)
            ),
            dtype=(
                "float32"
                if basis is not None or subset is not None
                else (store_dtype or DEFAULT_STORE_DTYPE)
            ),
            steps=steps,
            shard_size=shard_size,
            num_prompts=len(corpus),
            corpus={
                "source": corpus.source,
                "split": split,
                "sha256": corpus.sha256(),
                "splits": corpus.split_counts(),
                "dropped": corpus.dropped,
            },
            basis=basis,
        )

    sync = wait_for_everyone or (lambda: None)
    # The main process creates (or checks) the manifest, and saves a fitted basis, before
    # anyone writes a shard; the others then read the basis it chose.
    writer = None
    if process_index == 0:
        earlier = _earlier_report(out)
        plan = plan_for(basis)
        logger.info("store %s: %s, %s", out, describe_encoding(plan.encoding), plan.dtype)
        writer = StoreWriter(out, plan, create=True)
    sync()
    if writer is None:
        if fitted:
            basis = fit_basis(target, corpus, out, steps, "auto", batch_size)
        plan = plan_for(basis)
        writer = StoreWriter(out, plan, create=False)
    mine = [k for k in range(plan.num_shards) if k % num_processes == process_index]
    todo = [k for k in mine if not writer.shard_done(k)]
    done_prompts = sum(len(writer.shard_range(k)) for k in mine if k not in todo)
    total = sum(len(writer.shard_range(k)) for k in mine)
    bar = tqdm(
        total=total,
        initial=done_prompts,
        unit="prompt",
        desc="collect",
        disable=not progress,
        position=process_index,
        dynamic_ncols=True,
    )
    start = time.perf_counter()
    for k in todo:
        rows = writer.shard_range(k)
        records = corpus.records[rows.start : rows.stop]
        texts = [r.text for r in records]
        if subset is not None:
            vectors = observe(target, texts, steps, batch_size, subset)
        elif basis is not None and basis.kind == "fitted":
            vectors = basis.coordinates_of(collect_vectors(target, texts, steps, batch_size))
        else:
            vectors = collect_vectors(target, texts, steps, batch_size, compact=basis is not None)
        meta = [{**r.meta, "split": r.split} for r in records]
        writer.write_shard(k, vectors, texts, meta)
        bar.update(len(texts))
    bar.close()
    seconds = time.perf_counter() - start
    sync()
    if process_index == 0:
        report = getattr(target, "collection_report", None)
        if report is None:
            plan.collection = {}
        elif not todo and earlier:
            plan.collection = earlier  # a rerun that wrote nothing keeps how the store was asked
        else:  # the queries of this run and process: say which shards they wrote
            plan.collection = {**report(), "shards_written": len(todo), "of": plan.num_shards}
        writer.finalise()
    return CollectResult(
        str(out),
        len(corpus),
        total - done_prompts,
        len(todo),
        len(mine) - len(todo),
        seconds,
        over_context,
        describe_encoding(plan.encoding),
    )


def collect_vectors(
    target: Target, texts: list[str], steps: int, batch_size: int, *, compact: bool = False
) -> np.ndarray:
    """Float32 `[n, steps, vocab]` for texts (`[n, steps, width]` basis coordinates with
    `compact`), batched by similar length to cut padding."""
    encode = getattr(target, "encode", None)
    forward = getattr(target, "forward_ids", None)
    if encode is None or forward is None:
        return target.next_token_logprobs(texts, steps=steps).numpy()
    ids = encode(texts)
    # Sorting by length inside a shard is deterministic, so reruns reproduce shards exactly.
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    out = None
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = [ids[i] for i in idx]
        values = forward(batch, steps, hidden=True)[1] if compact else forward(batch, steps)
        if out is None:
            out = np.empty((len(ids), steps, values.shape[-1]), dtype=np.float32)
        out[idx] = values.numpy()
    return out
