"""The on-disk distribution store: sharded, memory-mappable (prompt, log-prob vector) pairs.

Layout of a store directory::

    manifest.json          target fingerprint, dtype, steps, encoding, corpus, shard size
    shards/000000.npy      per prompt and step: the log-probs [n, steps, vocab] in the store
                           dtype ("full" encoding), or fp32 coordinates [n, steps, width] in
                           the target's output-layer basis ("output-layer", compact: 577 or
                           fewer numbers per step instead of 49,152 for the default target)
    shards/000000.json     the shard's prompts and metadata; written last, so it marks the
                           shard complete (a shard without it is ignored and rewritten)

A compact store gives back full vectors (`vectors`, `batches`) once it has its basis: from
`attach(target)`, or loaded on first use from the target its fingerprint names. The basis's
hash in the manifest must match, so other weights, another dtype or a defense are refused.

Shard k always holds prompts [k * shard_size, (k + 1) * shard_size) of the planned list, so a
store is the same whoever wrote which shard, in one process or many, in one run or several.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..cache import atomic_open
from ..errors import StoreError, VectorError
from ..targets.base import TargetFingerprint

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: full vectors only, no `encoding` in the manifest
FULL = {"kind": "full"}
FORMATS = ("auto", "compact", "full", "subset")
MANIFEST = "manifest.json"
SHARD_DIR = "shards"
STORE_DTYPES = {"float16": np.float16, "float32": np.float32}
DEFAULT_STORE_DTYPE = "float16"
DEFAULT_SHARD_SIZE = 256
READ_BATCH = 256  # vectors read at a time by whole-store passes (statistics, memory)


def _atomic_write(path: Path, write) -> None:
    """Write via a temporary file, fsync, and rename, so readers never see a partial file."""
    try:
        with atomic_open(path, "wb") as f:
            write(f)
    except OSError as exc:
        raise StoreError(
            f"could not write {path}: {exc}. Completed shards are kept; fix the cause "
            "(disk space, permissions) and rerun the same command to resume."
        ) from exc


def write_json(path: Path, obj) -> None:
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1, ensure_ascii=False).encode()))


def check_finite(vectors: np.ndarray, prompts: Sequence[str]) -> None:
    """Raise VectorError naming the first prompt whose vector has NaN or inf."""
    bad = ~np.isfinite(vectors.reshape(len(vectors), -1)).all(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        raise VectorError(
            f"the log-prob vector of prompt {i} ({prompts[i][:60]!r}) contains NaN or inf; "
            "nothing was written for its shard"
        )


def bytes_per_step(manifest: dict) -> int:
    """Bytes one prompt-step takes in a store's shards, from its manifest."""
    width = int(manifest["encoding"].get("width", manifest["vocab_size"]))
    return width * np.dtype(STORE_DTYPES[manifest["dtype"]]).itemsize


def describe_encoding(encoding: dict) -> str:
    """'full' or e.g. 'output-layer (576 per step, basis 1a2b3c4d)'."""
    if encoding.get("kind", "full") == "full":
        return "full"
    if encoding["kind"] == "subset":
        sha = str(encoding.get("subset_sha256", ""))[:8]
        return f"subset ({encoding.get('width')} tokens per step, subset {sha})"
    sha = str(encoding.get("basis_sha256", ""))[:8]
    return f"{encoding['kind']} ({encoding.get('width')} per step, basis {sha})"


@dataclass
class StorePlan:
    """What a store holds: written once to the manifest and checked on every append."""

    fingerprint: TargetFingerprint
    dtype: str
    steps: int
    shard_size: int
    num_prompts: int
    corpus: dict  # source, sha256, split, counts, dropped
    encoding: dict = field(default_factory=lambda: dict(FULL))  # or a basis's encoding()
    basis: object = field(default=None, repr=False, compare=False)  # a fitted one is saved
    collection: dict = field(default_factory=dict, compare=False)  # how it was asked for

    @property
    def width(self) -> int:
        """Numbers stored per step."""
        return int(self.encoding.get("width", self.fingerprint.vocab_size))

    def to_manifest(self, complete: bool = False) -> dict:
        return {
            "format": "logit2prompt-distribution-store",
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint.to_dict(),
            "dtype": self.dtype,
            "steps": self.steps,
            "vocab_size": self.fingerprint.vocab_size,
            "encoding": self.encoding,
            "shard_size": self.shard_size,
            "num_prompts": self.num_prompts,
            "num_shards": self.num_shards,
            "corpus": self.corpus,
            "complete": complete,
            **({"collection": self.collection} if self.collection else {}),
        }

    @property
    def num_shards(self) -> int:
        return -(-self.num_prompts // self.shard_size)


def read_manifest(path: str | Path) -> dict:
    """The manifest of a store directory, validated; StoreError if missing or foreign."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise StoreError(f"{path} is not a distribution store (no {MANIFEST})")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise StoreError(f"{file} is unreadable or corrupted: {exc}") from exc
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != "logit2prompt-distribution-store"
    ):
        raise StoreError(f"{file} is not a logit2prompt distribution store manifest")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise StoreError(
            f"{path} has store format version {manifest.get('format_version')}; "
            f"this logit2prompt reads versions {', '.join(map(str, READABLE_VERSIONS))}"
        )
    manifest.setdefault("encoding", dict(FULL))
    return manifest


class StoreWriter:
    """Creates or reopens a store for a plan; writes shards atomically."""

    def __init__(self, path: str | Path, plan: StorePlan, *, create: bool = True):
        self.path = Path(path)
        self.plan = plan
        if plan.dtype not in STORE_DTYPES:
            raise StoreError(f"unknown store dtype {plan.dtype!r}; choose float16 or float32")
        self.shard_dir = self.path / SHARD_DIR
        if (self.path / MANIFEST).exists():
            self._check_compatible(read_manifest(self.path))
            if create:
                # A run killed mid-write leaves its temporary file; only the process that
                # creates the writer (the main one, before any shard is written) removes them.
                for stale in self.shard_dir.glob(".*.tmp*"):
                    stale.unlink(missing_ok=True)
        elif create:
            try:
                self.shard_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create store directory {self.path}: {exc}") from exc
            if plan.encoding.get("file"):  # a fitted basis lives beside the shards, once
                plan.basis.save(self.path)
            write_json(self.path / MANIFEST, plan.to_manifest())

    def _check_compatible(self, manifest: dict) -> None:
        theirs = TargetFingerprint.from_dict(manifest["fingerprint"])
        diffs = self.plan.fingerprint.differences(theirs)
        if diffs:
            raise StoreError(
                f"{self.path} was collected from a different target "
                f"({theirs.describe()}, this run: {self.plan.fingerprint.describe()}); "
                f"differences: {'; '.join(diffs)}. Use a new --out directory."
            )
        if manifest["encoding"] != self.plan.encoding:
            raise StoreError(
                f"{self.path} stores encoding {describe_encoding(manifest['encoding'])} but "
                f"this run writes {describe_encoding(self.plan.encoding)}; use a new --out "
                "directory or the store's --format"
            )
        for key, ours in (
            ("dtype", self.plan.dtype),
            ("steps", self.plan.steps),
            ("shard_size", self.plan.shard_size),
        ):
            if manifest.get(key) != ours:
                raise StoreError(
                    f"{self.path} stores {key}={manifest.get(key)!r} but this run asks for "
                    f"{key}={ours!r}; use a new --out directory or the store's setting"
                )
        if manifest["corpus"].get("sha256") != self.plan.corpus.get("sha256"):
            raise StoreError(
                f"{self.path} was collected from a different prompt list "
                f"({manifest['corpus'].get('source')}, split {manifest['corpus'].get('split')}, "
                f"{manifest.get('num_prompts')} prompts); this run has "
                f"{self.plan.corpus.get('source')}, split {self.plan.corpus.get('split')}, "
                f"{self.plan.num_prompts} prompts. Use a new --out directory."
            )

    def shard_range(self, k: int) -> range:
        start = k * self.plan.shard_size
        return range(start, min(start + self.plan.shard_size, self.plan.num_prompts))

    def shard_done(self, k: int) -> bool:
        """A shard is done when its index JSON exists and its array has the right shape."""
        index = self.shard_dir / f"{k:06d}.json"
        array = self.shard_dir / f"{k:06d}.npy"
        if not (index.is_file() and array.is_file()):
            return False
        try:
            arr = np.load(array, mmap_mode="r")
        except (ValueError, OSError):
            return False
        return arr.shape[0] == len(self.shard_range(k))

    def write_shard(
        self, k: int, vectors: np.ndarray, prompts: list[str], meta: list[dict]
    ) -> None:
        """Write shard k (`[n, steps, width]`): the array first, then the index that marks
        it complete."""
        expected = len(self.shard_range(k))
        if len(vectors) != expected or len(prompts) != expected:
            raise StoreError(f"shard {k} must hold {expected} prompts, got {len(vectors)}")
        if vectors.shape[1:] != (self.plan.steps, self.plan.width):
            raise StoreError(
                f"shard {k} has shape {vectors.shape}, expected "
                f"[{expected}, {self.plan.steps}, {self.plan.width}]"
            )
        check_finite(vectors, prompts)
        arr = np.ascontiguousarray(vectors, dtype=STORE_DTYPES[self.plan.dtype])
        # float16 overflows to inf below -65504; real log-probs are far above that, but be sure.
        check_finite(arr, prompts)
        _atomic_write(self.shard_dir / f"{k:06d}.npy", lambda f: np.save(f, arr))
        write_json(
            self.shard_dir / f"{k:06d}.json",
            {"index": k, "start": self.shard_range(k).start, "prompts": prompts, "meta": meta},
        )

    def finalise(self) -> None:
        """Mark the store complete once every shard is on disk."""
        missing = [k for k in range(self.plan.num_shards) if not self.shard_done(k)]
        if missing:
            raise StoreError(f"{self.path}: shards {missing[:5]} are missing; rerun collect")
        write_json(self.path / MANIFEST, self.plan.to_manifest(complete=True))


class DistributionStore:
    """Random access to a store without loading it into memory (shards are memory-mapped)."""

    def __init__(self, path: str | Path, *, allow_incomplete: bool = False):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if not self.manifest.get("complete") and not allow_incomplete:
            raise StoreError(
                f"{self.path} is incomplete (collection was interrupted); rerun the same "
                "collect command to finish it"
            )
        self.fingerprint = TargetFingerprint.from_dict(self.manifest["fingerprint"])
        self.steps = int(self.manifest["steps"])
        self.vocab_size = int(self.manifest["vocab_size"])
        self.encoding: dict = self.manifest["encoding"]
        self.width = int(self.encoding.get("width", self.vocab_size))
        self._basis = None
        self._subset = None
        self.prompts: list[str] = []
        self.meta: list[dict] = []
        self._shard_of: list[tuple[int, int]] = []  # global index -> (shard, row)
        self._shard_files: list[Path] = []
        self._shard_rows: list[int] = []  # prompts each shard's index lists
        self._arrays: dict[int, np.ndarray] = {}
        shard_dir = self.path / SHARD_DIR
        for k in range(int(self.manifest["num_shards"])):
            index = shard_dir / f"{k:06d}.json"
            if not index.is_file():
                if allow_incomplete:
                    continue
                raise StoreError(f"{self.path}: shard {k} is missing ({index})")
            try:
                info = json.loads(index.read_text(encoding="utf-8"))
                prompts, meta = info["prompts"], info["meta"]
            except (ValueError, OSError, KeyError, TypeError) as exc:
                raise StoreError(f"{index} is corrupted: {exc}") from exc
            if len(prompts) != len(meta):
                raise StoreError(f"{index} is corrupted: {len(prompts)} prompts, {len(meta)} meta")
            slot = len(self._shard_files)
            self._shard_files.append(shard_dir / f"{k:06d}.npy")
            self._shard_rows.append(len(prompts))
            for row, (p, m) in enumerate(zip(prompts, meta, strict=True)):
                self.prompts.append(p)
                self.meta.append(m)
                self._shard_of.append((slot, row))
        expected = self.manifest.get("num_prompts")
        if self.manifest.get("complete") and len(self.prompts) != expected:
            raise StoreError(
                f"{self.path}: its shards list {len(self.prompts)} prompts, its manifest "
                f"{expected}; the store is corrupted (collect it again)"
            )

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def dim(self) -> int:
        """Length of one flattened example vector: steps * vocab."""
        return self.steps * self.vocab_size

    def _array(self, slot: int) -> np.ndarray:
        arr = self._arrays.get(slot)
        if arr is None:
            try:
                arr = np.load(self._shard_files[slot], mmap_mode="r")
            except (ValueError, OSError) as exc:
                raise StoreError(f"{self._shard_files[slot]} is corrupted: {exc}") from exc
            n = self._shard_rows[slot]
            if arr.ndim != 3 or arr.shape != (n, self.steps, self.width):
                raise StoreError(
                    f"{self._shard_files[slot]} has shape {arr.shape}, expected "
                    f"[{n}, {self.steps}, {self.width}] (its index lists {n} prompts)"
                )
            self._arrays[slot] = arr
        return arr

    @property
    def compact(self) -> bool:
        """Whether shards hold basis coordinates rather than full vectors."""
        return self.encoding.get("kind", "full") != "full"

    @property
    def bytes_per_step(self) -> int:
        """Bytes one prompt-step takes in the shards."""
        return bytes_per_step(self.manifest)

    @property
    def subset(self):
        """The `TokenSubset` a subset store observes (None for full and compact stores)."""
        from ..targets.subset import subset_of_store_or_config

        if self._subset is None:
            self._subset = subset_of_store_or_config(self.encoding)
        return self._subset

    def attach(self, source) -> None:
        """Give a compact store its basis: a `Target` (its fingerprint must match the store's)
        or a basis (`OutputBasis`, `FittedBasis`). StoreError naming the difference when it
        is not this store's. A subset store takes any basis of its vocabulary (an API store
        the white-box weights of the same model: `--basis-from`); rebuilding then checks each
        observation's residual on the subset, which another model's basis fails."""
        if not self.compact:
            return
        basis = source
        if hasattr(source, "fingerprint"):
            diffs = self.fingerprint.differences(source.fingerprint)
            if diffs and self.subset is None:
                raise StoreError(
                    f"{self.path} was collected from {self.fingerprint.describe()}, not "
                    f"{source.fingerprint.describe()}: {'; '.join(diffs)}"
                )
            basis = source.output_basis() if hasattr(source, "output_basis") else None
            if basis is None:
                raise StoreError(
                    f"{self.path} is compact ({describe_encoding(self.encoding)}) but "
                    f"{source.fingerprint.describe()} exposes no output-layer basis"
                )
        if self.subset is not None:
            from ..targets.subset import SubsetDecoder

            try:
                self._basis = SubsetDecoder(self.subset, basis)
            except VectorError as exc:
                raise StoreError(f"{self.path}: {exc}") from exc
            return
        theirs = basis.encoding()
        if theirs != self.encoding:
            raise StoreError(
                f"{self.path} stores coordinates in basis {describe_encoding(self.encoding)} "
                f"but the basis given is {describe_encoding(theirs)}: other weights, dtype or "
                "output layer; its vectors cannot be rebuilt from it"
            )
        self._basis = basis

    @property
    def basis(self):
        """The basis that turns stored coordinates into log-probs (compact stores), loaded
        from the target the fingerprint names on first use unless `attach`ed."""
        if self._basis is None and self.encoding.get("kind") == "fitted":
            from ..targets.basis import FittedBasis

            try:
                self.attach(FittedBasis.load(self.path))
            except (OSError, ValueError) as exc:
                raise StoreError(f"{self.path}: its fitted basis is unreadable: {exc}") from exc
        if self._basis is None and self.compact:
            fp = self.fingerprint
            if fp.dtype == "api":
                raise StoreError(
                    f"{self.path} holds {describe_encoding(self.encoding)} collected through "
                    f"an API ({fp.name}): its full vectors need a basis of that model's "
                    "vectors (attach the white-box target, `--basis-from`). An inverter "
                    "trained on the same token subset reads it as it is"
                )
            from ..targets import load_target

            try:
                target = load_target(fp.name, mode="raw", dtype=fp.dtype)
            except Exception as exc:  # noqa: BLE001 - any load failure gets the same advice
                raise StoreError(
                    f"{self.path} is compact: its full vectors need the output layer of "
                    f"{fp.name!r}, which could not be loaded ({exc}). Attach the target "
                    "(DistributionStore.attach) or collect with --format full"
                ) from exc
            basis = target.output_basis()
            if basis is None:
                raise StoreError(f"{fp.name!r} exposes no output-layer basis")
            self.attach(basis)
        return self._basis

    def _steps(self, steps: int | None) -> int:
        if steps is None:
            return self.steps
        if not 1 <= steps <= self.steps:
            raise StoreError(
                f"{self.path} holds {self.steps} steps per prompt; {steps} asked for "
                f"(collect with --steps {steps} or more)"
            )
        return steps

    def coordinates(self, indices: Sequence[int], steps: int | None = None) -> np.ndarray:
        """The stored float32 arrays `[len(indices), steps, width]` of the first `steps`
        steps (full vectors when the store is not compact)."""
        k = self._steps(steps)
        out = np.empty((len(indices), k, self.width), dtype=np.float32)
        for j, i in enumerate(indices):
            slot, row = self._shard_of[i]
            out[j] = self._array(slot)[row, :k]
        return out

    def vector(self, i: int, steps: int | None = None) -> np.ndarray:
        """Float32 log-probs of prompt i, `[steps, vocab]`."""
        return self.vectors([i], steps)[0]

    def vectors(self, indices: Sequence[int], steps: int | None = None) -> np.ndarray:
        """Float32 log-probs `[len(indices), steps, vocab]` of the first `steps` steps (all
        by default), rebuilt from the basis when the store is compact."""
        stored = self.coordinates(indices, steps)
        if not self.compact:
            return stored
        if self.subset is not None:
            try:
                return self.basis.decode(stored)[0]
            except VectorError as exc:
                raise StoreError(f"{self.path}: {exc}") from exc
        return self.basis.decode(stored)

    def observations(
        self, indices: Sequence[int], steps: int | None = None, subset=None
    ) -> np.ndarray:
        """What an inverter reads: float32 `[len(indices), steps, width]`. With a
        `TokenSubset`, its observations (a subset store's own, refused unless it is the same
        subset; otherwise read off full or compact vectors); without, full vectors."""
        if subset is None:
            return self.vectors(indices, steps)
        if self.subset is not None:
            diffs = self.subset.differences(subset)
            if diffs:
                raise StoreError(
                    f"{self.path} observes {self.subset.describe()} but the reader needs "
                    f"{subset.describe()}: {'; '.join(diffs)}"
                )
            return self.coordinates(indices, steps)
        if self.compact:
            from ..targets.subset import observe_coordinates

            return observe_coordinates(self.basis, self.coordinates(indices, steps), subset)
        return subset.observe(self.vectors(indices, steps))

    def indices(self, split: str | None = None) -> list[int]:
        """Indices of one split (recorded per prompt at collection), or all."""
        if split in (None, "all"):
            return list(range(len(self)))
        return [i for i, m in enumerate(self.meta) if m.get("split") == split]

    def batches(
        self,
        batch_size: int,
        *,
        indices: Sequence[int] | None = None,
        shuffle: bool = False,
        seed: int = 0,
        steps: int | None = None,
        subset=None,
    ) -> Iterator[tuple[list[int], list[str], np.ndarray]]:
        """Yield (indices, prompts, float32 vectors of the first `steps` steps) batches
        (observations of `subset` when given: see `observations`); memory stays one batch."""
        order = np.asarray(indices if indices is not None else range(len(self)))
        if shuffle:
            order = np.random.default_rng(seed).permutation(order)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size].tolist()
            yield idx, [self.prompts[i] for i in idx], self.observations(idx, steps, subset)


def merge_stores(out: str | Path, sources: Sequence[str | Path]) -> Path:
    """One store of several complete stores of the same target, steps, dtype and encoding
    (e.g. collected in pieces), their prompts in the order given. Shards are hard-linked
    where the file system allows (copied otherwise), so the sources stay as they were.
    StoreError when they differ, overlap in prompts, or `out` exists."""
    import shutil

    if len(sources) < 2:
        raise StoreError("merge needs at least two stores")
    out = Path(out)
    if out.exists():
        raise StoreError(f"{out} exists; merge writes a new store")
    stores = [DistributionStore(s) for s in sources]
    first = stores[0]
    keys = ("dtype", "steps", "vocab_size", "encoding")
    for store in stores[1:]:
        diffs = first.fingerprint.differences(store.fingerprint) + [
            f"{k}: {first.manifest.get(k)!r} vs {store.manifest.get(k)!r}"
            for k in keys
            if first.manifest.get(k) != store.manifest.get(k)
        ]
        if diffs:
            raise StoreError(f"{store.path} cannot join {first.path}: {'; '.join(diffs)}")
    seen: dict[str, Path] = {}
    for store in stores:
        for p in store.prompts:
            if p in seen:
                raise StoreError(f"{store.path} and {seen[p]} both hold the prompt {p[:60]!r}")
            seen[p] = store.path

    def link(shard_dir: Path) -> tuple[int, int]:
        k = start = 0
        for store in stores:
            for array in store._shard_files:
                info = json.loads(array.with_suffix(".json").read_text(encoding="utf-8"))
                target = shard_dir / f"{k:06d}.npy"
                try:
                    os.link(array, target)
                except OSError:  # another file system, or no hard links there
                    shutil.copyfile(array, target)
                info.update(index=k, start=start)
                write_json(shard_dir / f"{k:06d}.json", info)
                k, start = k + 1, start + len(info["prompts"])
        return k, start

    return _derived_store(
        out,
        first,
        link,
        corpus={"merged": [s.manifest["corpus"] for s in stores]},
        merged_from=[str(s.path) for s in stores],
    )


def filter_store(out: str | Path, source: str | Path, keep: Callable[[str], bool]) -> Path:
    """A new store of the prompts of `source` that `keep` accepts, in their order, with the
    same vectors (e.g. some sources of a mix, without collecting again). StoreError when
    `out` exists or nothing is kept; a failed run leaves no half-written `out`."""
    store = DistributionStore(source)
    out = Path(out)
    if out.exists():
        raise StoreError(f"{out} exists; filter writes a new store")
    by_shard: dict[int, list[int]] = {}  # shard slot -> kept global indices, in order
    for i, p in enumerate(store.prompts):
        if keep(p):
            by_shard.setdefault(store._shard_of[i][0], []).append(i)
    if not by_shard:
        raise StoreError(f"the filter keeps none of the {len(store)} prompts of {store.path}")

    def copy(shard_dir: Path) -> tuple[int, int]:
        start = 0
        for k, (slot, picked) in enumerate(by_shard.items()):
            arr = np.ascontiguousarray(store._array(slot)[[store._shard_of[i][1] for i in picked]])
            _atomic_write(shard_dir / f"{k:06d}.npy", lambda f, a=arr: np.save(f, a))
            info = {
                "index": k,
                "start": start,
                "prompts": [store.prompts[i] for i in picked],
                "meta": [store.meta[i] for i in picked],
            }
            write_json(shard_dir / f"{k:06d}.json", info)
            start += len(picked)
        return len(by_shard), start

    kept = sum(map(len, by_shard.values()))
    return _derived_store(
        out,
        store,
        copy,
        corpus={"filtered": store.manifest["corpus"], "kept": kept, "of": len(store)},
        filtered_from=str(store.path),
    )


def _derived_store(
    out: Path,
    base: DistributionStore,
    write_shards: Callable[[Path], tuple[int, int]],
    **manifest_fields,
) -> Path:
    """Write a complete store at `out`: shards from `write_shards(shard_dir)` (which returns
    the shard and prompt counts), `base`'s manifest and its fitted basis if it has one. On any
    failure no half-written `out` is left."""
    import shutil

    from ..targets.basis import FITTED_FILE

    try:
        shard_dir = out / SHARD_DIR
        shard_dir.mkdir(parents=True)
        num_shards, num_prompts = write_shards(shard_dir)
        # A fitted basis lives beside the shards: the new store needs it to decode them.
        if (base.path / FITTED_FILE).is_file():
            shutil.copyfile(base.path / FITTED_FILE, out / FITTED_FILE)
        manifest = dict(base.manifest)
        manifest.pop("collection", None)
        manifest.update(
            num_prompts=num_prompts, num_shards=num_shards, complete=True, **manifest_fields
        )
        # Shards of unequal sizes: a derived store is never resumed, only read.
        write_json(out / MANIFEST, manifest)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out
