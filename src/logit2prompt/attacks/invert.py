"""Inversion as users run it: from text (via the target), vector files, corpora or stores."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.store import DistributionStore
from ..errors import VectorError
from ..evaluation.metrics import per_example_scores
from ..models.inverter import Inverter
from ..targets.base import TargetFingerprint

VECTOR_KEY = "logprobs"
# How prompts are sampled from an inverter (`Inverter.invert` arguments): MBR's
# pseudo-references and the search's samples. Top-k 50 is transformers' default, in effect
# (unstated) in every run before it was named here.
SAMPLING = {"do_sample": True, "temperature": 1.0, "top_k": 50, "top_p": 0.95}


def sample_rows(batch_size: int, samples: int) -> int:
    """Rows per decode batch when each row draws `samples` sequences at once: `batch_size`
    rows up to 16 samples each (a prefix-lm reads each row's context once, and the more
    sequences a step decodes the cheaper each is on a CPU), fewer beyond."""
    return max(1, batch_size // max(1, samples // 16))


@contextmanager
def seeded(seed: int):
    """Draws seeded by `seed` inside, the caller's random state untouched."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


def target_for(inverter: Inverter, device: str | None = None, batch_size: int | None = None):
    """Load the target that produced the inverter's training data, and check it is the same."""
    if inverter.fingerprint is None:
        raise VectorError("this checkpoint records no target; pass vectors instead of text")
    return target_from_fingerprint(inverter.fingerprint, device, batch_size)


def target_from_fingerprint(
    fp: TargetFingerprint, device: str | None = None, batch_size: int | None = None
):
    """Load the target a fingerprint names, refusing it if it no longer matches."""
    from ..targets import load_target

    if fp.defense:
        raise VectorError(
            f"the vectors were read under the defense {fp.defense!r}, which is not rebuilt "
            f"from text here: collect them with `collect --defense {fp.defense!r}` and invert "
            "the store"
        )
    target = load_target(
        fp.name, mode=fp.mode, dtype=fp.dtype, device=device, batch_size=batch_size
    )
    # The attacker's user turn (system modes) or user mode's system prompt is part of the
    # template: reproduce it.
    if fp.template != target.fingerprint.template:
        if (turn := user_turn_of(fp.template, target)) is not None:
            target.set_user_turn(turn)
        elif (system := system_prompt_of(fp.template, target)) is not None:
            target.set_system_prompt(system)
    diffs = fp.differences(target.fingerprint)
    if diffs:
        raise VectorError(
            f"the target loaded as {fp.name!r} is not the recorded target: {'; '.join(diffs)}"
        )
    return target


def user_turn_of(template: str, target) -> str | None:
    """The user turn a system-mode template was rendered with, read against `target`'s own
    chat template (None: not a system mode, or the template has another shape)."""
    from ..targets.base import SYSTEM_MODES

    if getattr(target, "mode", None) not in SYSTEM_MODES:
        return None
    return _setting_in(template, target, "user_turn")


def system_prompt_of(template: str, target) -> str | None:
    """The system prompt a user-mode template was rendered with (None: not user mode, or
    the template has another shape)."""
    if getattr(target, "mode", None) != "user":
        return None
    return _setting_in(template, target, "system_prompt")


def _setting_in(template: str, target, attribute: str) -> str | None:
    """The value of `target.<attribute>` that renders `template`, found by rendering a marker
    in its place with `target`'s own chat template."""
    if not hasattr(target, "render"):
        return None
    marker = "\x00SETTING\x00"
    saved = getattr(target, attribute)
    try:
        setattr(target, attribute, marker)
        head, found, tail = target.render("{prompt}").partition(marker)
    finally:
        setattr(target, attribute, saved)
    if not found or not template.startswith(head) or not template.endswith(tail):
        return None
    return template[len(head) : len(template) - len(tail)] or None


def load_vectors(path: str | Path) -> tuple[np.ndarray, TargetFingerprint | None]:
    """Vectors from .npy or .safetensors (key 'logprobs'; metadata may hold a fingerprint)."""
    path = Path(path)
    if not path.is_file():
        raise VectorError(f"vector file {path} does not exist")
    if path.suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False), None
        except ValueError as exc:
            raise VectorError(f"{path} is not a numeric .npy array: {exc}") from exc
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="np") as f:
                keys = list(f.keys())
                key = VECTOR_KEY if VECTOR_KEY in keys else (keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise VectorError(f"{path} holds {keys}; name the vectors {VECTOR_KEY!r}")
                meta = f.metadata() or {}
                fp = (
                    TargetFingerprint.from_dict(json.loads(meta["fingerprint"]))
                    if "fingerprint" in meta
                    else None
                )
                return f.get_tensor(key), fp
        except SafetensorError as exc:
            raise VectorError(f"{path} is not a readable safetensors file: {exc}") from exc
    raise VectorError(f"{path}: vectors must be .npy or .safetensors")


def save_vectors(path: str | Path, vectors: np.ndarray, fingerprint: TargetFingerprint) -> None:
    """Write vectors as safetensors with the target fingerprint in the metadata."""
    from safetensors.numpy import save_file

    save_file(
        {VECTOR_KEY: np.ascontiguousarray(vectors, dtype=np.float32)},
        str(path),
        metadata={"fingerprint": json.dumps(fingerprint.to_dict())},
    )


def ensure_same_target(inverter: Inverter, store: DistributionStore) -> None:
    """VectorError naming both targets if `store` was not collected from the inverter's."""
    fp = inverter.fingerprint
    diffs = fp.reading_differences(store.fingerprint) if fp else []
    if diffs:
        raise VectorError(
            f"{store.path} was collected from {store.fingerprint.describe()} but the inverter "
            f"was trained on {inverter.fingerprint.describe()}: {'; '.join(diffs)}"
        )


def invert_store(
    inverter: Inverter,
    store: DistributionStore,
    batch_size: int = 64,
    progress: bool = True,
    invert: Callable[[torch.Tensor], list] | None = None,
    steps: int | None = None,
    **generate,
) -> list[str]:
    """Invert every vector of a store (refused if the store's target differs), `batch_size`
    at a time, with `inverter.invert(**generate)` or the given `invert` (e.g. a re-ranker),
    reading the first `steps` steps (default: as many as the inverter was trained on)."""
    ensure_same_target(inverter, store)
    steps = steps or inverter.config.steps  # more than the store holds: StoreError
    if invert is None:

        def invert(vectors: torch.Tensor) -> list:
            return inverter.invert(vectors, batch_size=batch_size, steps=steps, **generate)

    subset = inverter.token_subset
    batches = (v for _, _, v in store.batches(batch_size, steps=steps, subset=subset))
    return invert_batches(invert, batches, len(store), progress)


def invert_batches(
    invert: Callable[[torch.Tensor], list],
    batches: Iterable[np.ndarray],
    total: int,
    progress: bool = True,
) -> list:
    """`invert` over vector batches, concatenated, with a progress bar of `total` prompts."""
    out: list = []
    # Beam search over a whole test split takes tens of minutes on a CPU.
    with tqdm(total=total, unit="prompt", desc="invert", disable=not progress) as bar:
        for vectors in batches:
            out.extend(invert(torch.from_numpy(np.asarray(vectors))))
            bar.update(len(vectors))
    return out


def write_predictions(path: str | Path, references: list[str], predictions: list) -> dict:
    """JSONL of {hidden, recovered, bleu, token_f1, exact}; returns the mean scores."""
    firsts = [p[0] if isinstance(p, list) else p for p in predictions]
    per = per_example_scores(firsts, references)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, (ref, pred) in enumerate(zip(references, predictions, strict=True)):
            row = {"hidden": ref, "recovered": pred, **{k: v[i] for k, v in per.items()}}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {k: float(np.mean(v)) for k, v in per.items()}
