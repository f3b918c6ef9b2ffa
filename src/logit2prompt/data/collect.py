"""Collection: run a target over a corpus and write its distributions into a store.

Resumable (finished shards are skipped), and under `accelerate launch` each process takes the
shards k with k % num_processes == process_index, so the result is one store.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from ..errors import TargetError
from ..targets.base import Target
from .corpus import Corpus
from .store import DEFAULT_SHARD_SIZE, DEFAULT_STORE_DTYPE, StorePlan, StoreWriter


@dataclass
class CollectResult:
    path: str
    num_prompts: int
    prompts_written: int  # by this process in this run (resumed shards excluded)
    shards_written: int
    shards_skipped: int
    seconds: float
    dropped_over_context: int

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


def collect(
    target: Target,
    corpus: Corpus,
    out: str,
    *,
    split: str = "all",
    steps: int = 1,
    store_dtype: str = DEFAULT_STORE_DTYPE,
    shard_size: int = DEFAULT_SHARD_SIZE,
    batch_size: int = 32,
    process_index: int = 0,
    num_processes: int = 1,
    wait_for_everyone=None,
    progress: bool = True,
) -> CollectResult:
    """Collect `corpus` into the store at `out`; returns counts and timing of this run."""
    if steps < 1:
        raise TargetError(f"--steps must be >= 1, got {steps}")
    corpus, over_context = drop_over_context(target, corpus, steps)
    plan = StorePlan(
        fingerprint=target.fingerprint,
        dtype=store_dtype,
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
    )
    sync = wait_for_everyone or (lambda: None)
    # The main process creates (or checks) the manifest before anyone writes a shard.
    writer = StoreWriter(out, plan, create=process_index == 0) if process_index == 0 else None
    sync()
    if writer is None:
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
        vectors = collect_vectors(target, texts, steps, batch_size)
        meta = [{**r.meta, "split": r.split} for r in records]
        writer.write_shard(k, vectors, texts, meta)
        bar.update(len(texts))
    bar.close()
    seconds = time.perf_counter() - start
    sync()
    if process_index == 0:
        writer.finalise()
    return CollectResult(
        str(out),
        len(corpus),
        total - done_prompts,
        len(todo),
        len(mine) - len(todo),
        seconds,
        over_context,
    )


def collect_vectors(target: Target, texts: list[str], steps: int, batch_size: int) -> np.ndarray:
    """Float32 `[n, steps, vocab]` for texts, batched by similar length to cut padding."""
    encode = getattr(target, "encode", None)
    forward = getattr(target, "forward_ids", None)
    if encode is None or forward is None:
        return target.next_token_logprobs(texts, steps=steps).numpy()
    ids = encode(texts)
    # Sorting by length inside a shard is deterministic, so reruns reproduce shards exactly.
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    out = np.empty((len(ids), steps, target.vocab_size), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        out[idx] = forward([ids[i] for i in idx], steps).numpy()
    return out
