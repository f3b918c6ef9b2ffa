"""The inverter's shared base: an observation (log-prob vectors) in, the hidden prompt out.

Two architectures implement it, each in its own file with its own config:

- `T5Inverter` (t5_inverter.py, `T5InverterConfig`): the paper's (Morris et al. 2023) chunked
  vector -> pseudo-embeddings -> T5 encoder-decoder.
- `PrefixLMInverter` (prefix_lm.py, `PrefixLMConfig`): a pretrained causal LM, the target's own
  by default, reads the vector as a prefix of pseudo-token embeddings.

This base owns what they share: output tokens, the neighbour memory of a retrieval-augmented
inverter, input validation, decoding (`invert`) and checkpoints (checkpoint.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, VectorError
from ..targets.base import TargetFingerprint
from .config import CAUSAL, InverterConfig
from .features import NORMALIZATIONS, check_vectors
from .retrieval import NeighbourMemory


class Inverter(nn.Module):
    """Maps next-token log-prob vectors to the prompts that produced them.

    Build one with `Inverter.from_config(config, tokenizer, fingerprint)` (the architecture
    follows the config) or load one with `Inverter.from_pretrained(directory)`.
    """

    config: InverterConfig

    def __init__(
        self,
        config: InverterConfig,
        tokenizer=None,
        fingerprint: TargetFingerprint | None = None,
    ):
        super().__init__()
        if config.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}")
        if tokenizer is not None:
            fill_token_ids(config, tokenizer)
        self.config = config
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint
        self.memory: NeighbourMemory | None = None
        self._memory_ids: list[list[int]] | None = None

    @staticmethod
    def from_config(
        config: InverterConfig,
        tokenizer=None,
        fingerprint: TargetFingerprint | None = None,
        decoder_config: dict | None = None,
    ) -> Inverter:
        """A new inverter of the config's architecture (`decoder_config`: a prefix-lm's decoder
        architecture, when its weights come from a checkpoint rather than `decoder_init`)."""
        if config.decoder == CAUSAL:
            from .prefix_lm import PrefixLMInverter

            return PrefixLMInverter(config, tokenizer, fingerprint, decoder_config)
        from .t5_inverter import T5Inverter

        return T5Inverter(config, tokenizer, fingerprint)

    @property
    def causal(self) -> bool:
        """Whether the decoder is a pretrained causal LM (prefix-lm)."""
        return self.config.decoder == CAUSAL

    # ------------------------------------------------------------------ architecture hooks
    def set_feature_stats(
        self, mean: np.ndarray, std: np.ndarray, basis: np.ndarray | None = None
    ) -> None:
        """Feature statistics fitted on the training vectors (see the subclasses)."""
        raise NotImplementedError

    def encode_inputs(self, vectors: torch.Tensor) -> torch.Tensor:
        """Flat float32 `[B, dim]` log-probs -> the decoder-side embeddings of the vector."""
        raise NotImplementedError

    def forward(
        self,
        vectors: torch.Tensor,
        labels: torch.Tensor,
        neighbour_ids: torch.Tensor | None = None,
        per_example: bool = False,
    ) -> torch.Tensor:
        """Summed token cross-entropy of `labels` (padded with -100) given flat vectors, or
        `[B]` sums per example with `per_example` (how well each label explains its vector).

        The sum, not the mean, so the trainer can normalise by the token count of the whole
        global batch across processes. Only real label positions go through the output
        projection: with a 49k-token vocabulary that projection dominates the step.
        """
        raise NotImplementedError

    def label_logprobs(
        self, vectors: torch.Tensor, labels: torch.Tensor, neighbour_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Log-probs over the output vocabulary `[B, T, V]` at every position of `labels`
        (padded with -100), each given the vector and the labels before it (and the
        neighbours: `neighbour_ids`, or the memory's nearest)."""
        raise NotImplementedError

    def generate_ids(
        self, vectors: torch.Tensor, neighbour_ids: torch.Tensor | None = None, **generate_kwargs
    ) -> torch.Tensor:
        """Output token ids for flat vectors; keyword arguments go to `generate`."""
        raise NotImplementedError

    @staticmethod
    def _reduce(nll: torch.Tensor, keep: torch.Tensor, per_example: bool) -> torch.Tensor:
        if not per_example:
            return nll.sum()
        rows = keep.nonzero()[:, 0]
        return torch.zeros(len(keep), device=nll.device).index_add_(0, rows, nll)

    # ------------------------------------------------------------------ neighbours
    def set_memory(self, memory: NeighbourMemory) -> None:
        """The training prompts a retrieval-augmented inverter reads beside each vector (a
        plain inverter may carry them too, for the nearest-neighbour baseline and the
        re-ranker: it does not read them)."""
        self.memory, self._memory_ids = memory, None

    def neighbour_ids(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """Memory rows per example -> `[B, k, width]` token ids (each neighbour's first
        `neighbour_length` tokens), padded with -1."""
        if self._memory_ids is None:
            self._memory_ids = encode_labels(
                self.tokenizer, self.memory.prompts, self.config.max_length
            )
        return self._pad_neighbours([[self._memory_ids[i] for i in row] for row in rows])

    def text_neighbour_ids(self, rows: Sequence[Sequence[str]]) -> torch.Tensor:
        """Given prompts per example -> `[B, k, width]` token ids, read like memory rows: the
        neighbours a retrieval-augmented inverter reads in place of its memory's nearest
        (e.g. the candidates a search judged closest; `invert(neighbours=...)`)."""
        if not self.config.neighbours:
            raise CheckpointError("this inverter reads no neighbours (config.neighbours is 0)")
        if self.tokenizer is None:
            raise CheckpointError("this inverter has no tokenizer to encode neighbours with")
        if any(not row or not all(t.strip() for t in row) for row in rows):
            raise ValueError("every example needs at least one neighbour, none of them blank")
        flat = [t for row in rows for t in row]
        ids = iter(encode_labels(self.tokenizer, flat, self.config.max_length))
        return self._pad_neighbours([[next(ids) for _ in row] for row in rows])

    def _pad_neighbours(self, rows: Sequence[Sequence[list[int]]]) -> torch.Tensor:
        """Token id lists per example -> `[B, k, width]` (the first k, each cut to the
        neighbour length), padded with -1; an example with fewer than k reads only those."""
        k = self.config.neighbours
        width = self.config.neighbour_length or self.config.max_length
        out = torch.full((len(rows), k, width), -1, dtype=torch.long)
        for b, row in enumerate(rows):
            for r, ids in enumerate(list(row)[:k]):
                ids = ids[:width]
                out[b, r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def find_neighbours(self, vectors: torch.Tensor) -> torch.Tensor:
        """Nearest memory prompts of flat `[B, k * vocab]` vectors as `neighbour_ids` (the
        memory keys the first `steps` steps, so more steps given are not used here)."""
        if self.memory is None:
            raise CheckpointError(
                "this retrieval-augmented inverter has no neighbour memory; load it with "
                "from_pretrained or call set_memory"
            )
        keys = vectors[:, : self.config.dim].cpu()
        return self.neighbour_ids(self.memory.search(keys, self.config.neighbours))

    def steps_of(self, vectors: torch.Tensor) -> int:
        """How many steps a flat `[B, k * vocab]` batch holds."""
        return vectors.shape[-1] // self.config.input_width

    @property
    def token_subset(self):
        """The `TokenSubset` it observes (None: whole vectors)."""
        if not self.config.subset:
            return None
        if getattr(self, "_token_subset", None) is None:
            from ..targets.subset import TokenSubset

            self._token_subset = TokenSubset.from_encoding(self.config.subset)
        return self._token_subset

    # ------------------------------------------------------------------ inversion
    def as_batch(self, logprobs, steps: int | None = None) -> torch.Tensor:
        """Validated float32 `[B, k * width]` from `[vocab]`, `[B, vocab]` or `[B, S, vocab]`:
        the first k = `steps` steps (default: as many as it was trained on). An inverter that
        reads a token subset takes whole vectors (it reads the subset off them) or subset
        observations `[..., |S|]`. VectorError on a wrong vocabulary, too few steps, or
        NaN/inf."""
        x = torch.as_tensor(np.asarray(logprobs) if not torch.is_tensor(logprobs) else logprobs)
        vocab = self.config.vocab_size
        described = self.fingerprint.describe() if self.fingerprint else "its training target"
        if x.dim() in (1, 2):
            x = x.reshape(-1, 1, x.shape[-1]) if x.dim() == 2 else x.reshape(1, 1, -1)
        subset = self.token_subset
        widths = (vocab,) if subset is None else (vocab, subset.size)
        if x.dim() != 3 or x.shape[-1] not in widths:
            also = "" if subset is None else f" or [batch, steps, {subset.size}] (its subset)"
            raise VectorError(
                f"log-prob vectors of shape {tuple(x.shape)} do not fit this inverter, which "
                f"reads [batch, steps, {vocab}]{also} from {described}"
            )
        if subset is not None:
            from ..targets.subset import centre

            # Centring a subset observation again changes nothing; NaN/inf stay and are caught.
            x = subset.observe(x.float()) if x.shape[-1] == vocab else centre(x)
            vocab = subset.size
        k = self.config.steps if steps is None else int(steps)
        if k < 1 or k > self.config.max_steps:
            raise VectorError(
                f"this inverter reads 1 to {self.config.max_steps} steps, not {k} (trained on "
                f"{self.config.steps})"
            )
        if k > x.shape[1]:
            raise VectorError(
                f"{k} steps asked for but the vectors hold {x.shape[1]} (collect with "
                f"--steps {k} or more{'' if steps else ', or pass fewer steps'})"
            )
        if self.config.neighbours and k < self.config.steps:
            raise VectorError(
                f"a retrieval-augmented inverter finds neighbours by its {self.config.steps} "
                f"trained steps; {k} is too few"
            )
        return check_vectors(x[:, :k], (k, vocab), described)

    def ensure_fingerprint(self, fingerprint: TargetFingerprint | None) -> None:
        """VectorError naming both targets if vectors from `fingerprint` are not this
        inverter's (nothing to check when either is unknown)."""
        if fingerprint is not None and self.fingerprint is not None:
            diffs = self.fingerprint.reading_differences(fingerprint)
            if diffs:
                raise VectorError(
                    f"these vectors come from {fingerprint.describe()} but the inverter was "
                    f"trained on {self.fingerprint.describe()}: {'; '.join(diffs)}"
                )

    def invert(
        self,
        logprobs,
        *,
        num_beams: int = 1,
        num_return_sequences: int = 1,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 50,
        top_p: float = 1.0,
        no_repeat_ngram_size: int = 0,
        batch_size: int = 64,
        fingerprint: TargetFingerprint | None = None,
        bf16: bool = False,
        grouped: bool = False,
        steps: int | None = None,
        neighbours: Sequence[Sequence[str]] | None = None,
    ) -> list[str] | list[list[str]]:
        """Recover prompts from log-prob vectors `[vocab]`, `[B, vocab]` or `[B, S, vocab]`,
        reading the first `steps` (default: the trained number; more extends at test time).
        `neighbours`: per vector, the prompts a retrieval-augmented inverter reads in place of
        its memory's nearest (`text_neighbour_ids`).

        Returns one string per vector, or a list of `num_return_sequences` strings per vector
        (always a list per vector with `grouped`, so callers need not special-case one).
        A `fingerprint` that differs from the checkpoint's target is refused. `bf16` decodes
        under bf16 autocast (faster; benchmarks/decode_precision.py measures what it costs).
        `do_sample` draws from the `top_k` most likely tokens (transformers' default, 50), then
        their top-p head, at `temperature`.
        """
        if self.tokenizer is None:
            raise CheckpointError(
                "this inverter has no output tokenizer; load it from a checkpoint"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.ensure_fingerprint(fingerprint)
        x = self.as_batch(logprobs, steps)
        given = None
        if neighbours is not None:
            if len(neighbours) != len(x):
                raise ValueError(f"{len(neighbours)} neighbour rows for {len(x)} vectors")
            given = self.text_neighbour_ids(neighbours)
        was_training = self.training
        self.eval()
        kwargs = {
            "num_beams": max(num_beams, num_return_sequences) if not do_sample else 1,
            "num_return_sequences": num_return_sequences,
            "do_sample": do_sample,
        }
        if do_sample:
            # top_k 50 is transformers' own default for sampling, now stated.
            kwargs.update(temperature=temperature, top_k=top_k, top_p=top_p)
        if no_repeat_ngram_size:
            # An undertrained inverter loops ("the remaining the remaining ..."); blocking
            # repeated n-grams is the usual seq2seq remedy.
            kwargs["no_repeat_ngram_size"] = no_repeat_ngram_size
        texts: list[str] = []
        try:
            for start in range(0, len(x), batch_size):
                with self._bf16_autocast() if bf16 else nullcontext():
                    near = None if given is None else given[start : start + batch_size]
                    ids = self.generate_ids(x[start : start + batch_size], near, **kwargs)
                texts.extend(self.tokenizer.batch_decode(ids, skip_special_tokens=True))
        finally:  # a failed decode leaves a model in training mode as it found it
            self.train(was_training)
        texts = [t.strip() for t in texts]
        if num_return_sequences == 1 and not grouped:
            return texts
        k = num_return_sequences
        return [texts[i : i + k] for i in range(0, len(texts), k)]

    @contextmanager
    def _bf16_autocast(self):
        """bf16 autocast whose weight casts are made once per context, not once per op and
        decoding step. Autocast caches the bf16 copy of a leaf float32 tensor only if it
        requires grad; frozen weights (a LoRA decoder's) do not, so every generated token
        re-cast every weight (half the decode time on 2 CPU cores). The flags are set for the
        duration only (decoding runs without grad, so nothing is recorded), and put back."""
        device = self.feature_mean.device.type
        frozen = [p for p in self.parameters() if not p.requires_grad and p.dtype == torch.float32]
        for p in frozen:
            p.requires_grad_(True)
        try:
            with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
                yield
        finally:
            for p in frozen:
                p.requires_grad_(False)

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(
        self,
        directory: str | Path,
        training_args: dict | None = None,
        *,
        slim: bool = False,
        dtype: str = "float32",
    ) -> None:
        """Write weights (safetensors), config, tokenizer, fingerprint and training args.
        `slim` (a LoRA prefix-lm): leave out what the decoder's pretrained weights give back,
        and store the rest in `dtype` (see `checkpoint.py`)."""
        from .checkpoint import save_inverter

        save_inverter(self, directory, training_args, slim=slim, dtype=dtype)

    def save_extra(self, directory: Path) -> None:
        """Architecture-specific files beside the weights (none by default)."""

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | None = None) -> Inverter:
        """Load a checkpoint written by `save_pretrained` (either architecture, checkpoint
        versions 1 and 2, full or slim), or a shipped inverter by name (`"default"`,
        `"smollm2-135m-instruct"`); CheckpointError if it is foreign or corrupted."""
        from .checkpoint import load_inverter

        model = load_inverter(directory, device)
        if not isinstance(model, cls):
            raise CheckpointError(
                f"{directory} holds a {type(model).__name__}, not a {cls.__name__}"
            )
        return model


def native_bf16(device: str | None = None) -> bool:
    """Whether bf16 runs natively on `device` (default: CUDA if available, else the CPU): a
    GPU with bf16, or a CPU with AMX or AVX512-BF16. On other CPUs (AVX2 only) bf16 is emulated
    and several times slower than fp32 (benchmarks/README.md, "Decoding in bf16 autocast"). The
    one test behind every `auto` precision: training, collection dtype, decoding."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device != "cpu":
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:  # not Linux: assume the slow path
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def fill_token_ids(config: InverterConfig, tokenizer) -> None:
    """Take the output vocabulary and special ids from the output tokenizer."""
    config.output_vocab_size = len(tokenizer)
    pad = tokenizer.pad_token_id
    eos = tokenizer.eos_token_id
    if eos is None:
        raise CheckpointError("the output tokenizer has no end-of-sequence token")
    config.eos_token_id = eos
    config.pad_token_id = pad if pad is not None else eos
    # Start decoding from BOS where the tokenizer has one, so start != end-of-sequence.
    bos = tokenizer.bos_token_id
    config.decoder_start_token_id = bos if bos is not None and bos != eos else config.pad_token_id
    config.__post_init__()  # checks that need the output vocabulary


def encode_labels(
    tokenizer, prompts: Sequence[str], max_length: int, ids: Sequence[list[int]] | None = None
) -> list[list[int]]:
    """Target token ids of each prompt, truncated, ending with EOS (`ids`: the prompts
    already tokenised without special tokens)."""
    if ids is None:
        ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [x[: max_length - 1] + [eos] for x in ids]


def pad_labels(labels: Sequence[Sequence[int]]) -> torch.Tensor:
    """Right-pad label id lists with -100 (ignored by the loss) into a `[batch, width]` tensor."""
    padded = torch.full((len(labels), max(len(x) for x in labels)), -100, dtype=torch.long)
    for row, x in enumerate(labels):
        padded[row, : len(x)] = torch.tensor(x, dtype=torch.long)
    return padded


def pack_neighbours(ids: torch.Tensor, pad_left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each row's real neighbour tokens go when packed together, in order, and
    whether each packed slot is real: `(order [B, W], real [B, W])` for neighbour ids
    `[B, n, L]` (-1 padded), W the longest row's count. The padding goes to the front
    (`pad_left`, for a causal decoder) or the end; either way a row's layout is its own,
    not its batch's."""
    real = (ids >= 0).flatten(1)
    # A stable sort on "is real" (or "is padding") keeps the tokens' order.
    order = torch.sort((real if pad_left else ~real).int(), dim=1, stable=True).indices
    width = max(int(real.sum(1).max()), 1)  # trim the common padding
    order = order[:, -width:] if pad_left else order[:, :width]
    return order, real.gather(1, order)
