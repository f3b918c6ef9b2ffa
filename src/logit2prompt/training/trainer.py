"""Training the inverter on a distribution store, with Hugging Face Accelerate.

The same code runs on one CPU, one GPU, or under `accelerate launch` on several GPUs or nodes.
Every process draws the same seeded permutation of the training set each epoch and takes its
own slice of each global batch, so the data position is a pure function of the step: resuming
needs only the step, the weights, the optimizer, the scheduler and the RNG state.

The settings live in config.py. This module stays one file (~530 lines) because the loop, its
checkpoints and the exact-resume checks share the Trainer's state and are read together.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.store import READ_BATCH, DistributionStore
from ..defenses.chain import parse_defense
from ..distributed import accelerate_cpu
from ..errors import CheckpointError, StoreError
from ..evaluation.metrics import score
from ..models.config import CAUSAL, PRESETS, InverterConfig
from ..models.inverter import Inverter, encode_labels, pad_labels
from ..models.prefix_lm import fit_subspace
from ..targets.base import TargetFingerprint
from ..targets.embedded import target_weights
from .config import (
    RECIPE_DEFAULTS_BEFORE,
    RECIPE_FIELDS,
    TrainConfig,
    default_batch,
    resolve_mixed_precision,
)

CHECKPOINT_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_STATE = "optimizer.pt"
RNG_STATE = "rng_state_{}.pt"
FINAL_MARKER = "TRAINING_COMPLETE"
logger = logging.getLogger(__name__)
# InverterConfig fields that `--set` may change on an `--init-from` checkpoint: no weight shape
# or value depends on them.
INIT_OVERRIDES = frozenset({"max_length", "neighbour_length", "reply_tokens"})
# Steps a multi-step inverter can read at inversion (test-time extension past training's).
MULTI_STEP_POSITIONS = 64
# Rows (prompt-steps) the statistics and the subspace are fitted on at most: with K steps a
# prompt gives K rows, and the subspace's Gram matrix is rows x rows.
STATS_ROWS = 4096
# Global batches sorted by length together (`bucket_lengths`): wide enough that batches of
# similar length exist, narrow enough that the epoch's order stays well mixed.
BUCKET_WINDOW = 64


def _output_tokenizer(cfg: TrainConfig, store: DistributionStore):
    """`--output-tokenizer`, by default the target's own (at hand wherever it was collected)."""
    if cfg.output_tokenizer:
        return _load_tokenizer(cfg.output_tokenizer)
    target = target_weights(store.fingerprint.name)
    return _load_tokenizer(target, " (the output tokenizer; pass --output-tokenizer)")


def _load_tokenizer(name: str, hint: str = ""):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot load the tokenizer of {name!r}{hint}: {exc}") from exc


def _schedule(optimizer, cfg: TrainConfig):
    from transformers import get_scheduler

    return get_scheduler(
        cfg.schedule, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps
    )


def latest_checkpoint(out: str | Path) -> Path | None:
    """The newest complete checkpoint under out/checkpoints (complete = has trainer_state)."""
    root = Path(out) / CHECKPOINT_DIR
    if not root.is_dir():
        return None
    done = [
        p
        for p in root.glob("step-*")
        # step-N.tmp is a save a kill interrupted (it can hold trainer_state already).
        if p.name[len("step-") :].isdigit() and (p / TRAINER_STATE).is_file()
    ]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def check_schedule(cfg: TrainConfig) -> None:
    """CheckpointError for counts that must be positive (a zero would divide by zero after
    the costly set-up, train nothing, or keep every checkpoint)."""
    names = ("max_steps", "grad_accum", "per_device_batch_size", "eval_every", "eval_samples")
    names += ("save_every", "keep_checkpoints", "log_every")
    bad = [f"--{n.replace('_', '-')} {getattr(cfg, n)}" for n in names if getattr(cfg, n) < 1]
    if bad:
        raise CheckpointError(f"{', '.join(bad)}: must be at least 1")


class Trainer:
    """Wires store, inverter, optimizer and Accelerate together; `run()` trains."""

    def __init__(self, cfg: TrainConfig, accelerator=None):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        if not cfg.per_device_batch_size:  # recorded resolved, so checkpoints say what ran
            cfg = replace(cfg, per_device_batch_size=default_batch(cfg.preset))
        check_schedule(cfg)
        self.cfg = cfg
        if accelerator is None:
            # Accelerate keeps one mixed-precision setting per process and refuses a second
            # Trainer (a notebook, the quickstart after another run) that asks for another.
            # Only that part is reset; the distributed setup (PartialState) stays.
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(reset_partial_state=False)
        self.accelerator = accelerator or Accelerator(
            cpu=accelerate_cpu(),
            mixed_precision=resolve_mixed_precision(cfg.mixed_precision),
            log_with="tensorboard",
            project_config=ProjectConfiguration(
                project_dir=cfg.out, logging_dir=os.path.join(cfg.out, "logs")
            ),
        )
        acc = self.accelerator
        self.store = DistributionStore(cfg.data)
        self.train_idx = np.asarray(self.store.indices(), dtype=np.int64)
        self.val_store = DistributionStore(cfg.val_data) if cfg.val_data else None
        if self.val_store is not None:
            diffs = self.store.fingerprint.differences(self.val_store.fingerprint)
            if diffs:
                raise StoreError(f"--val-data comes from another target: {'; '.join(diffs)}")
        self.global_micro = cfg.per_device_batch_size * acc.num_processes
        if len(self.train_idx) < self.global_micro:
            raise StoreError(
                f"{cfg.data} has {len(self.train_idx)} prompts, fewer than one global batch "
                f"({self.global_micro}); lower --per-device-batch-size"
            )
        self.steps = cfg.steps or self.store.steps
        if not 1 <= self.steps <= self.store.steps:
            raise StoreError(
                f"--steps {cfg.steps}: {cfg.data} holds {self.store.steps} steps per prompt"
            )
        if self.val_store is not None and self.val_store.steps < self.steps:
            raise StoreError(
                f"--val-data holds {self.val_store.steps} steps per prompt; training reads "
                f"{self.steps}"
            )
        self.defense = parse_defense(cfg.defense)
        self.subset = self._token_subset()
        fingerprint = self.store.fingerprint
        self._subspace = None  # a causal decoder's subspace, fitted once when the model is built
        if self.defense:
            both = ",".join(d for d in (fingerprint.defense, self.defense.spec) if d)
            fingerprint = replace(fingerprint, defense=both)
        if cfg.init_from:
            self.model = Inverter.from_pretrained(cfg.init_from)
            self._extend_steps(self.model)
            self._check_init(self.model)
            if cfg.neighbours and cfg.neighbours != self.model.config.neighbours:
                # A trained prefix-lm learns to read neighbours on top of what it knows
                # (--neighbours 0, the default, keeps the checkpoint's own).
                self.model = self.model.with_neighbours(cfg.neighbours)
            self.model.fingerprint = fingerprint
            self._override_checkpoint(self.model.config)
        else:
            self.model = self._new_model(fingerprint)
        if cfg.gradient_checkpointing:
            # Results do not change (the same forward is recomputed), so it is not a recipe
            # field: a run may resume with it switched on or off.
            decoder = self.model.lm if self.model.causal else self.model.t5
            # transformers >= 5.2x names it activation checkpointing (the old name warns).
            enable = getattr(decoder, "activation_checkpointing_enable", None)
            enable = enable or decoder.gradient_checkpointing_enable
            enable({"use_reentrant": False})
        self.labels = self._labels(fresh=not cfg.init_from)
        self.micro_per_epoch = len(self.train_idx) // self.global_micro
        self.optimizer = torch.optim.AdamW(
            self._param_groups(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        self.scheduler = _schedule(self.optimizer, cfg)
        self.neighbour_rows: list[list[int]] | None = None  # retrieval-augmented only
        self.given_neighbours: list[list[str]] | None = None  # --neighbour-texts
        self._lengths: np.ndarray | None = None  # per example, for bucket_lengths
        self.step = 0
        self.history: list[dict] = []
        # Seconds spent in optimizer steps over all runs of this output (resumes included);
        # validation and checkpoints are not counted: the x-axis of learning curves.
        self.train_seconds = 0.0

    def _override_checkpoint(self, config) -> None:
        """`--set` on a fine-tuned checkpoint: only the lengths it writes and reads may change
        (no weight depends on them), e.g. `--set max_length=257` to adapt it to longer
        prompts; any other field must equal the checkpoint's."""
        # The same value as the checkpoint's is no change (a recipe may pass its --set again).
        wrong = sorted(
            k
            for k, v in self.cfg.overrides.items()
            if k not in INIT_OVERRIDES and getattr(config, k, None) != v
        )
        if wrong:
            raise CheckpointError(
                f"--set {', '.join(wrong)} cannot change a checkpoint given to --init-from (its "
                f"architecture is kept); only {', '.join(sorted(INIT_OVERRIDES))} can"
            )
        for key, value in self.cfg.overrides.items():
            if key not in INIT_OVERRIDES:
                continue
            if key == "reply_tokens":
                if not isinstance(value, bool) or not hasattr(config, key):
                    raise CheckpointError(f"--set {key}={value!r}: a prefix-lm's true or false")
                setattr(config, key, value)
                try:
                    config.__post_init__()  # its checks: whole vectors, one vocabulary
                except ValueError as exc:
                    raise CheckpointError(f"--set {key}={value!r}: {exc}") from exc
                continue
            low = 2 if key == "max_length" else 0  # a prompt token and EOS; 0: whole neighbours
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise CheckpointError(f"--set {key}={value!r}: expected a number of tokens")
            setattr(config, key, value)

    def _labels(self, fresh: bool) -> list[list[int]]:
        """The store's prompts as label ids. A new inverter's `max_length` grows to fit the
        longest prompt (`collect --max-tokens` decides how long they are) unless `--set
        max_length` fixes it; prompts longer than a fixed one are cut, with a warning."""
        config = self.model.config
        prompts = list(self.store.prompts)
        ids = self.model.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        lengths = [len(x) + 1 for x in ids]  # + EOS
        longest = max(lengths, default=0)
        if longest > config.max_length and fresh and "max_length" not in self.cfg.overrides:
            logger.info(
                "max_length %d -> %d tokens (with EOS): the longest prompt of %s",
                config.max_length,
                longest,
                self.cfg.data,
            )
            config.max_length = longest
        cut = sum(n > config.max_length for n in lengths)
        if cut:
            logger.warning(
                "%d of %d prompts of %s are longer than the inverter's max_length (%d tokens "
                "with EOS) and are cut; --set max_length=%d keeps them whole",
                cut,
                len(lengths),
                self.cfg.data,
                config.max_length,
                longest,
            )
        return encode_labels(self.model.tokenizer, prompts, config.max_length, ids=ids)

    def _token_subset(self):
        """The token subset the inverter reads (None: whole vectors): a subset store's own,
        or `subset_size` tokens of the target's tokenizer drawn with `subset_seed`."""
        cfg, store = self.cfg, self.store
        if store.subset is not None:
            if cfg.subset_size not in (0, store.subset.size):
                raise StoreError(
                    f"{cfg.data} observes a subset of {store.subset.size} tokens; "
                    f"--subset-size {cfg.subset_size} cannot be read from it"
                )
            subset = store.subset
        elif cfg.subset_size:
            from ..targets.hf import hash_tokenizer
            from ..targets.subset import TokenSubset

            tokenizer = _load_tokenizer(target_weights(store.fingerprint.name))
            if hash_tokenizer(tokenizer) != store.fingerprint.tokenizer_sha256:
                raise StoreError(
                    f"the tokenizer of {store.fingerprint.name!r} is not the one {cfg.data} "
                    "was collected with; a token subset cannot be drawn from it"
                )
            subset = TokenSubset.choose(
                tokenizer, store.vocab_size, cfg.subset_size, cfg.subset_seed
            )
        else:
            return None
        if self.defense:
            raise StoreError(
                "--defense with a token subset: a defense moves vectors off the model's "
                "subspace, which a subset relies on; train on whole vectors"
            )
        return subset

    @property
    def width(self) -> int:
        """Entries per step the inverter reads."""
        return self.subset.size if self.subset is not None else self.store.vocab_size

    def _param_groups(self) -> list[dict]:
        """A pretrained causal decoder's own weights learn at `decoder_lr`; everything else
        (adapters included) at `lr`; frozen weights get no optimizer state."""
        model = self.model
        if not model.causal:
            return [{"params": list(model.parameters())}]
        lm = {id(p) for n, p in model.lm.named_parameters() if "lora_" not in n}
        trained = [p for p in model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in trained if id(p) not in lm]},
            {"params": [p for p in trained if id(p) in lm], "lr": self.cfg.decoder_lr},
        ]
        return [g for g in groups if g["params"]]

    def _new_model(self, fingerprint) -> Inverter:
        cfg = self.cfg
        causal = PRESETS.get(cfg.preset, {}).get("decoder") == CAUSAL
        if causal and cfg.t5_init:
            raise StoreError(f"--t5-init does not apply to preset {cfg.preset!r} (no T5 in it)")
        # A causal LM copies from its context by attention: no copy head, no T5 to start from.
        family = (
            {"lora_rank": cfg.lora_rank}
            if causal
            else {
                "t5_init": cfg.t5_init,
                "neighbour_copy": cfg.neighbour_copy and cfg.neighbours > 0,
            }
        )
        config = InverterConfig.preset(
            cfg.preset,
            vocab_size=self.store.vocab_size,
            subset=self.subset.encoding() if self.subset is not None else None,
            steps=self.steps,
            step_positions=MULTI_STEP_POSITIONS if self.steps > 1 else 0,
            normalization=cfg.normalization,
            neighbours=cfg.neighbours,
            **family,
            **cfg.overrides,
        )
        if causal:
            if cfg.output_tokenizer:
                raise StoreError(
                    "--output-tokenizer does not apply to a causal-LM decoder: it writes with "
                    "its own tokenizer (choose the LM with --decoder-init)"
                )
            # By default the target's own weights: at hand wherever its vectors were collected.
            config.decoder_init = cfg.decoder_init or target_weights(self.store.fingerprint.name)
            tokenizer = _load_tokenizer(config.decoder_init)
            self._subspace = self._fit_subspace(config.subspace_dim)
            config.subspace_dim = self._subspace[0].shape[1]
        else:
            tokenizer = _output_tokenizer(cfg, self.store)
        torch.manual_seed(cfg.seed)
        return Inverter.from_config(config, tokenizer, fingerprint)

    def _stats_batches(self):
        """(Defended) float32 `[rows, vocab]` arrays, one row per step, of a seeded sample of
        the training prompts, in READ_BATCH pieces: the same sample on every process."""
        n = self._stats_prompts()
        sample = np.sort(
            np.random.default_rng(self.cfg.seed).choice(self.train_idx, n, replace=False)
        )
        for i in range(0, n, READ_BATCH):
            vectors = self._read(self.store, sample[i : i + READ_BATCH].tolist())
            yield vectors.reshape(-1, self.width).numpy()

    def _stats_prompts(self) -> int:
        return min(self.cfg.stats_sample, len(self.train_idx), max(STATS_ROWS // self.steps, 2))

    def _stats_rows(self) -> int:
        return self._stats_prompts() * self.steps

    def _fit_subspace(self, dims: int):
        """Basis, coordinate mean/std of the training steps' principal directions (one
        basis for every step)."""
        # Filled in place rather than concatenated: the sample is the fit's largest array.
        vectors = np.empty((self._stats_rows(), self.width), dtype=np.float32)
        filled = 0
        for part in self._stats_batches():
            vectors[filled : filled + len(part)] = part
            filled += len(part)
        basis, mean, std, _ = fit_subspace(vectors[:filled], 1, dims)
        return basis, mean, std

    def _read(self, store: DistributionStore, indices) -> torch.Tensor:
        """Flat (defended) float32 `[n, steps * vocab]` of the first `steps` steps."""
        return self._defended(
            torch.from_numpy(store.observations(list(indices), self.steps, self.subset))
        )

    def _extend_steps(self, model: Inverter) -> None:
        """A multi-step prefix-lm fine-tuned on more steps than it was trained on (up to its
        step positions): no weight depends on the count once the pseudo-tokens per step are
        pinned, and the new steps' position rows start at zero (as test-time extension)."""
        config = model.config
        if not model.causal or not config.step_positions:
            return
        if not config.steps < self.steps <= config.step_positions:
            return
        logger.info(
            "extending %s from %d to %d steps", self.cfg.init_from, config.steps, self.steps
        )
        config.step_tokens = config.tokens_per_step
        config.steps = self.steps

    def _check_init(self, model: Inverter) -> None:
        theirs = (model.config.vocab_size, model.config.steps)
        ours = (self.store.vocab_size, self.steps)
        if theirs != ours:
            raise CheckpointError(
                f"--init-from {self.cfg.init_from} reads (vocab, steps) = {theirs} but "
                f"{self.cfg.data} holds {ours}"
            )
        mine, its = self.subset, model.token_subset
        if (mine is None) != (its is None) or (mine and its and mine.differences(its)):
            described = lambda s: s.describe() if s else "whole vectors"  # noqa: E731
            raise CheckpointError(
                f"--init-from {self.cfg.init_from} reads {described(its)}; this run reads "
                f"{described(mine)}"
            )
        if model.fingerprint is not None:
            # Same model and tokenizer is what fine-tuning needs; a defense or another threat
            # model (where the hidden prompt sits: user turn, system turn, guarded) is what it
            # adapts to.
            def adaptable(fp: TargetFingerprint) -> TargetFingerprint:
                return replace(fp, defense="", mode="", template="")

            diffs = adaptable(model.fingerprint).differences(adaptable(self.store.fingerprint))
            if diffs:
                raise CheckpointError(
                    f"--init-from {self.cfg.init_from} was trained on another target: "
                    + "; ".join(diffs)
                )
            if model.fingerprint.mode != self.store.fingerprint.mode:
                logger.info(
                    "adapting an inverter trained in %s mode to %s mode",
                    model.fingerprint.mode,
                    self.store.fingerprint.mode,
                )

    # ------------------------------------------------------------------ data
    def _global_batch(self, micro_index: int) -> np.ndarray:
        epoch, j = divmod(micro_index, self.micro_per_epoch)
        perm = np.random.default_rng(self.cfg.seed + epoch).permutation(self.train_idx)
        if self.cfg.bucket_lengths:
            perm = self._bucketed(perm, epoch)
        return perm[j * self.global_micro : (j + 1) * self.global_micro]

    def _bucketed(self, perm: np.ndarray, epoch: int) -> np.ndarray:
        """The epoch's permutation with each window of BUCKET_WINDOW global batches sorted by
        token count and its batches shuffled: same examples per window, little padding per
        batch, still a pure function of (seed, epoch)."""
        lengths = self._example_lengths()
        gm = self.global_micro
        usable = self.micro_per_epoch * gm
        out = perm.copy()
        rng = np.random.default_rng([self.cfg.seed, epoch])
        for start in range(0, usable, gm * BUCKET_WINDOW):
            window = perm[start : min(start + gm * BUCKET_WINDOW, usable)]
            batches = window[np.argsort(lengths[window], kind="stable")].reshape(-1, gm)
            out[start : start + len(window)] = batches[rng.permutation(len(batches))].ravel()
        return out

    def _example_lengths(self) -> np.ndarray:
        """Tokens the decoder reads per training example beyond its fixed prefix: the prompt's
        labels and, retrieval-augmented, its neighbours' (the memory holds the training
        store's own prompts, so a neighbour's length is its label length)."""
        if self._lengths is None:
            lengths = np.array([len(ids) for ids in self.labels], dtype=np.int64)
            if self.given_neighbours is not None:
                model = self.accelerator.unwrap_model(self.model)
                ids = model.text_neighbour_ids(self.given_neighbours)
                lengths = lengths + (ids >= 0).sum((1, 2)).numpy()
            elif self.neighbour_rows is not None:
                config = self.accelerator.unwrap_model(self.model).config
                cut = np.minimum(lengths, config.neighbour_length or config.max_length)
                extra = [cut[list(rows)].sum() for rows in self.neighbour_rows]
                lengths = lengths + np.array(extra, dtype=np.int64)
            self._lengths = lengths
        return self._lengths

    def _batch_tensors(self, indices: np.ndarray, device) -> tuple:
        """The model's inputs for these store indices: (vectors, labels[, neighbour ids])."""
        vectors = self._read(self.store, indices.tolist())
        padded = pad_labels([self.labels[i] for i in indices])
        if self.neighbour_rows is None and self.given_neighbours is None:
            return vectors.to(device), padded.to(device)
        model = self.accelerator.unwrap_model(self.model)
        if self.given_neighbours is not None:
            ids = model.text_neighbour_ids([self.given_neighbours[i] for i in indices])
        else:
            ids = model.neighbour_ids([self.neighbour_rows[i] for i in indices])
        return vectors.to(device), padded.to(device), ids.to(device)

    def build_memory(self) -> None:
        """Retrieval-augmented inverters: sketch the (defended) training store into the
        model's neighbour memory, and find each training example's neighbours, itself and
        copies of its text excluded (a test prompt is never in the memory either)."""
        from ..models.retrieval import NeighbourMemory

        model = self.accelerator.unwrap_model(self.model)
        memory = NeighbourMemory.from_store(
            self.store,
            model.config.dim,
            steps=self.steps,
            dims=model.config.neighbour_dims,
            seed=self.cfg.seed,
            transform=lambda v: self._defended(torch.from_numpy(v)).numpy(),
            subset=self.subset,
            progress=self.cfg.progress and self.accelerator.is_main_process,
        )
        model.set_memory(memory)
        rows = list(range(len(self.store)))
        self.neighbour_rows = memory.search_sketches(
            memory.keys, model.config.neighbours, exclude=rows
        )

    def _defended(self, vectors: torch.Tensor) -> torch.Tensor:
        """`[n, steps, vocab]` -> flat `[n, dim]`, through the defense when one is set."""
        if self.defense:
            vectors = self.defense.apply(vectors)
        return vectors.reshape(len(vectors), -1)

    def fit_feature_stats(self) -> None:
        """Mean/std of the training vectors (a seeded sample), identical on every process."""
        from ..models.features import feature_stats

        if self.model.causal:
            basis, mean, std = self._subspace or self._fit_subspace(self.model.config.subspace_dim)
            self.model.set_feature_stats(mean, std, basis)
            return
        mean, std = feature_stats(self._stats_batches(), self.width)
        self.model.set_feature_stats(mean, std)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        acc = self.accelerator
        path = Path(self.cfg.out) / CHECKPOINT_DIR / f"step-{self.step}"
        tmp = path.with_name(path.name + ".tmp")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        # Every process's RNG state goes through the main one, which writes the whole
        # checkpoint: a process on another node needs no folder of its own to save.
        rngs = [rng]
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            rngs = gather_object(rngs)
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            acc.unwrap_model(self.model).save_pretrained(tmp, training_args=asdict(self.cfg))
            opt = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
            }
            if acc.scaler is not None:  # fp16: the loss scale it has learnt, and its growth
                opt["scaler"] = acc.scaler.state_dict()
            torch.save(opt, tmp / OPTIMIZER_STATE)
            for i, process_rng in enumerate(rngs):
                torch.save(process_rng, tmp / RNG_STATE.format(i))
            state = {
                "step": self.step,
                "history": self.history,
                "global_batch": self.global_micro * self.cfg.grad_accum,
                "micro_batch": self.global_micro,  # with the global batch: the data order
                "train_prompts": len(self.train_idx),
                "train_seconds": self.train_seconds,
            }
            (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1))
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)  # a checkpoint appears whole or not at all
            old = sorted(
                (p for p in path.parent.glob("step-*") if p.suffix != ".tmp"),
                key=lambda p: int(p.name.split("-")[1]),
            )
            for stale in old[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(stale, ignore_errors=True)
        acc.wait_for_everyone()
        return path

    def load_checkpoint(self, path: Path) -> None:
        from safetensors.torch import load_model

        acc = self.accelerator
        try:
            state = json.loads((path / TRAINER_STATE).read_text())
            planned = self.ensure_same_recipe(path, state).get("max_steps")
            load_model(acc.unwrap_model(self.model), str(path / "model.safetensors"))
            opt = torch.load(path / OPTIMIZER_STATE, map_location="cpu", weights_only=True)
            rng = torch.load(path / RNG_STATE.format(acc.process_index), weights_only=True)
            self.optimizer.load_state_dict(opt["optimizer"])
            self.scheduler.load_state_dict(opt["scheduler"])
            if acc.scaler is not None and "scaler" in opt:
                acc.scaler.load_state_dict(opt["scaler"])
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
            step = int(state["step"])
        except CheckpointError:
            raise
        except Exception as exc:  # a truncated safetensors, a foreign pickle, a missing key...
            raise CheckpointError(f"cannot resume from {path}: {exc!r}") from exc
        if planned not in (None, self.cfg.max_steps) and acc.is_main_process:
            logger.warning(
                "resuming with --max-steps %d where the run planned %d: the %s schedule is "
                "rebuilt for the new length, so the learning rate jumps to where that one is "
                "at step %d",
                self.cfg.max_steps,
                planned,
                self.cfg.schedule,
                step,
            )
        logger.info("resuming from %s (step %d)", path, step)
        self.step = step
        self.history = state.get("history", [])
        self.train_seconds = float(state.get("train_seconds", 0.0))

    def ensure_same_recipe(self, path: Path, state: dict) -> dict:
        """CheckpointError naming each difference if the checkpoint at `path` was written by a
        run with other settings (RECIPE_FIELDS, global batch, training prompts): resuming it
        would silently train a mixture of two recipes."""
        saved = json.loads((path / "training_args.json").read_text())
        now = asdict(self.cfg)
        saved = {**RECIPE_DEFAULTS_BEFORE, **saved}
        # LoRA adapts a causal decoder; a T5 inverter has none, whatever the flag says.
        fields = [k for k in RECIPE_FIELDS if self.model.causal or k != "lora_rank"]
        diffs = [
            f"{k} {saved[k]!r} there, {now[k]!r} here"
            for k in fields
            if k in saved and saved[k] != now[k]
        ]
        mine = {
            "global_batch": self.global_micro * self.cfg.grad_accum,
            "micro_batch": self.global_micro,
            "train_prompts": len(self.train_idx),
        }
        diffs += [
            f"{k.replace('_', ' ')} {state[k]} there, {v} here"
            for k, v in mine.items()
            if k in state and state[k] != v
        ]
        if diffs:
            raise CheckpointError(
                f"{path} was written by a run with other settings ({'; '.join(diffs)}); "
                f"resume with the same ones, or train into another --out"
            )
        return saved

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict:
        """Validation loss and greedy BLEU / token F1 / exact on a fixed validation sample."""
        model = self.accelerator.unwrap_model(self.model)
        store = self.val_store
        if store is None:
            return {}
        idx = list(range(min(self.cfg.eval_samples, len(store))))
        vectors = self._read(store, idx)
        refs = [store.prompts[i] for i in idx]
        padded = pad_labels(encode_labels(model.tokenizer, refs, model.config.max_length))
        device = next(model.parameters()).device
        model.eval()
        # In training-sized batches: the whole sample at once holds its label positions'
        # vocabulary-wide logits (and their log-softmax) together, ~0.8 GB for 64 prompts.
        size = self.cfg.per_device_batch_size
        with torch.no_grad():
            total = sum(
                model(vectors[i : i + size].to(device), padded[i : i + size].to(device)).item()
                for i in range(0, len(idx), size)
            )
        loss = total / int((padded != -100).sum())
        predictions = model.invert(vectors.view(len(vectors), self.steps, -1), batch_size=32)
        model.train()
        metrics = score(predictions, refs, ci=False)
        return {
            "val_loss": loss,
            "val_bleu": metrics["bleu"]["mean"],
            "val_token_f1": metrics["token_f1"]["mean"],
            "val_exact": metrics["exact"]["mean"],
            "examples": [
                {"hidden": r, "recovered": p}
                for r, p in zip(refs[:3], predictions[:3], strict=True)
            ],
        }

    # ------------------------------------------------------------------ loop
    def micro_batches(self, step: int) -> list[np.ndarray]:
        """The global micro-batches of optimizer step `step` (a pure function of the step)."""
        accum = self.cfg.grad_accum
        return [self._global_batch(step * accum + a) for a in range(accum)]

    def train_step(self, batches: list[np.ndarray] | None = None, tensors=None):
        """One optimizer step over this process's share of the global batch.

        `tensors` (a list of model inputs per micro-batch, already on the device) skips
        the data loading; the throughput benchmark uses it to measure the bare model step.
        Returns (summed loss on this process, global token count, gradient norm).
        """
        cfg, acc = self.cfg, self.accelerator
        batches = batches if batches is not None else self.micro_batches(self.step)
        total_tokens = sum(len(self.labels[i]) for b in batches for i in b)
        loss_sum = torch.zeros((), device=acc.device)
        r = acc.process_index
        for a, batch in enumerate(batches):
            if tensors is None:
                mine = batch[r * cfg.per_device_batch_size : (r + 1) * cfg.per_device_batch_size]
                inputs = self._batch_tensors(mine, acc.device)
            else:
                inputs = tensors[a]
            sync = a == len(batches) - 1
            ctx = contextlib.nullcontext() if sync else acc.no_sync(self.model)
            with ctx, acc.autocast():
                batch_loss = self.model(*inputs)
                # DDP averages over processes; scaling by num_processes / global token count
                # makes the update the exact token mean of the global batch.
                acc.backward(batch_loss * (acc.num_processes / total_tokens))
            loss_sum += batch_loss.detach()
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        # One value on every process; fp16's loss scaler skips overflowing steps itself.
        finite = acc.mixed_precision == "fp16" or torch.isfinite(torch.as_tensor(grad_norm))
        if not finite:
            last = latest_checkpoint(cfg.out)
            raise CheckpointError(
                f"non-finite loss or gradient at step {self.step + 1}; nothing was updated "
                + (f"and {last} is intact" if last else "(no checkpoint yet)")
                + ": lower --lr or check the store for outliers, then --resume"
            )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, total_tokens, grad_norm

    def prepare(self, resume: bool = False) -> None:
        """Feature statistics (or a checkpoint), then wrap model and optimizer for Accelerate."""
        checkpoint = latest_checkpoint(self.cfg.out) if resume else None
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)
        elif not self.cfg.init_from or self.defense:
            # A fine-tuned inverter keeps its checkpoint's statistics, unless it adapts to a
            # defense: defended vectors (floors of -100, flattened or noisy rows) standardised
            # with clean statistics land far outside anything it has seen.
            self.fit_feature_stats()
        if self.model.config.neighbours:
            if self.cfg.neighbour_texts and self.model.memory is not None:
                # A corrector fine-tuned from a retrieval-augmented checkpoint keeps that
                # checkpoint's memory (its first proposals still read memory neighbours).
                logger.info("keeping %s's neighbour memory", self.cfg.init_from)
            else:
                self.build_memory()
            if self.cfg.neighbour_texts:
                from .corrector import read_neighbour_texts

                self.given_neighbours = read_neighbour_texts(
                    self.cfg.neighbour_texts, list(self.store.prompts)
                )
        elif self.cfg.neighbour_texts:
            raise StoreError("--neighbour-texts needs an inverter that reads neighbours")
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)

    def _out_of_time(self, spent: float) -> bool:
        """Whether this run has spent `max_minutes` in training steps (every process agrees:
        the main one's clock decides)."""
        if self.cfg.max_minutes is None:
            return False
        over = float(spent >= 60 * self.cfg.max_minutes)
        spent = torch.tensor(over, device=self.accelerator.device)
        return bool(self.accelerator.reduce(spent, "max").item())

    def run(self, resume: bool = False) -> Inverter:
        cfg, acc = self.cfg, self.accelerator
        self.prepare(resume)
        if acc.is_main_process:
            acc.init_trackers(
                "train",
                config={
                    k: v for k, v in asdict(cfg).items() if isinstance(v, (int, float, str, bool))
                },
            )
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            disable=not (cfg.progress and acc.is_main_process),
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )
        self.model.train()
        spent, examples = 0.0, 0  # this run's training seconds and examples
        last = False
        while self.step < cfg.max_steps and not last:
            t0 = time.perf_counter()
            loss_sum, total_tokens, grad_norm = self.train_step()
            seconds = time.perf_counter() - t0
            spent += seconds
            self.train_seconds += seconds
            self.step += 1
            examples += self.global_micro * cfg.grad_accum
            bar.update(1)
            last = self.step == cfg.max_steps or self._out_of_time(spent)
            if self.step % cfg.log_every == 0 or last:
                train_loss = (acc.reduce(loss_sum, "sum") / total_tokens).item()
                logs = {
                    "train_loss": train_loss,
                    "lr": self.scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm),
                    "examples_per_s": examples / spent,
                }
                acc.log(logs, step=self.step)
                bar.set_postfix(loss=f"{train_loss:.3f}")
            if self.val_store is not None and (self.step % cfg.eval_every == 0 or last):
                if acc.is_main_process:
                    metrics = self.evaluate()
                    self.history.append(
                        {
                            "step": self.step,
                            "train_minutes": self.train_seconds / 60,
                            **{k: v for k, v in metrics.items() if k != "examples"},
                        }
                    )
                    acc.log({k: v for k, v in metrics.items() if k != "examples"}, step=self.step)
                    bar.write(
                        f"step {self.step}: val loss {metrics['val_loss']:.3f}, BLEU "
                        f"{metrics['val_bleu']:.1f}, F1 {metrics['val_token_f1']:.1f}, exact "
                        f"{metrics['val_exact']:.1f}% | {metrics['examples'][0]['hidden']!r}"
                        f" -> {metrics['examples'][0]['recovered']!r}"
                    )
                acc.wait_for_everyone()
            if self.step % cfg.save_every == 0 and not last:
                self.save_checkpoint()
        bar.close()
        if self.step < cfg.max_steps:
            logger.info("time budget of %s minutes spent at step %d", cfg.max_minutes, self.step)
        self.save_checkpoint()
        model = acc.unwrap_model(self.model)
        if acc.is_main_process:
            # The marker says the model beside it is whole: gone while it is rewritten.
            (Path(cfg.out) / FINAL_MARKER).unlink(missing_ok=True)
            args = {**asdict(self.cfg), "history": self.history, "steps_done": self.step}
            model.save_pretrained(cfg.out, training_args=args)
            (Path(cfg.out) / FINAL_MARKER).write_text(str(self.step))
        acc.wait_for_everyone()
        acc.end_training()
        return model


def is_trained(out: str | Path) -> bool:
    return (Path(out) / FINAL_MARKER).is_file()
