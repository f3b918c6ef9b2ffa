"""The inverter: log-prob vector -> pseudo-embedding sequence -> T5 encoder-decoder -> prompt.

Or, with `decoder="causal"`, a pretrained causal LM reads the vector as a prefix (lm_decoder.py).

Checkpoint layout (`save_pretrained(dir)`)::

    inverter_config.json   InverterConfig (every size; no magic numbers in code)
    model.safetensors      weights, feature statistics included
    fingerprint.json       the target the vectors came from
    training_args.json     how it was trained (written by the trainer)
    tokenizer files        the output tokenizer
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, VectorError
from ..targets.base import TargetFingerprint
from .features import NORMALIZATIONS, check_vectors, num_chunks, unroll
from .lm_decoder import centre, load_causal_lm, teacher_forced_states
from .retrieval import NeighbourMemory

CONFIG_NAME = "inverter_config.json"
WEIGHTS_NAME = "model.safetensors"
FINGERPRINT_NAME = "fingerprint.json"
DECODER_CONFIG_NAME = "decoder_config.json"  # architecture of a causal decoder (no download)
DECODERS = ("t5", "causal")
TRAINING_ARGS_NAME = "training_args.json"
CHECKPOINT_FORMAT = "logit2prompt-inverter"
CHECKPOINT_VERSION = 1


@dataclass
class InverterConfig:
    """Every size of the inverter. Presets: `InverterConfig.preset(name, ...)`."""

    vocab_size: int  # of the target: entries per distribution
    steps: int = 1  # distributions per prompt (PILS-style multi-step uses > 1)
    chunk_width: int = 1024  # d: entries of the vector per encoder position
    embed_hidden: int = 1024  # hidden width of the chunk -> pseudo-embedding MLP
    d_model: int = 256
    d_ff: int = 1024
    d_kv: int = 64
    num_heads: int = 4
    num_layers: int = 4
    num_decoder_layers: int = 4
    dropout: float = 0.0
    feed_forward_proj: str = "gated-gelu"
    tie_word_embeddings: bool = False
    normalization: str = "standardize"
    max_length: int = 64  # output tokens (the paper's prompts have at most 64 tokens)
    output_vocab_size: int = 0  # of the output tokenizer; filled from it
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    t5_init: str | None = None  # hub id or directory of a pretrained T5 to start from
    # Retrieval augmentation (not in the paper): the encoder also reads the token ids of the
    # `neighbours` training prompts whose vectors are nearest (see retrieval.py).
    neighbours: int = 0
    neighbour_dims: int = 1024  # count-sketch width of the neighbour memory's keys
    # Pointer-generator output: each token is either generated or copied from a neighbour.
    neighbour_copy: bool = False
    # "t5": the paper's encoder-decoder. "causal": a pretrained causal LM (`decoder_init`, by
    # default the target's own weights) reads `prefix_length` pseudo-embeddings made from the
    # vector's coordinates in its `subspace_dim` principal directions (see lm_decoder.py).
    decoder: str = "t5"
    decoder_init: str | None = None
    prefix_length: int = 16
    subspace_dim: int = 0  # filled by the trainer from the training vectors' rank

    @property
    def dim(self) -> int:
        return self.steps * self.vocab_size

    @property
    def seq_len(self) -> int:
        return num_chunks(self.dim, self.chunk_width)

    @classmethod
    def preset(cls, name: str, **overrides) -> InverterConfig:
        """'tiny' (tests), 'small' (CPU quickstart), 'base' (T5-base sizes, for GPUs)."""
        sizes = PRESETS.get(name)
        if sizes is None:
            raise ValueError(
                f"unknown inverter preset {name!r}; choose one of {', '.join(PRESETS)}"
            )
        return cls(**{**sizes, **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> InverterConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise CheckpointError(f"inverter config has unknown fields {sorted(unknown)}")
        return cls(**d)


PRESETS = {
    "tiny": dict(
        chunk_width=64,
        embed_hidden=64,
        d_model=32,
        d_ff=64,
        d_kv=8,
        num_heads=4,
        num_layers=2,
        num_decoder_layers=2,
    ),
    "small": dict(
        chunk_width=1024,
        embed_hidden=1024,
        d_model=256,
        d_ff=1024,
        d_kv=64,
        num_heads=4,
        num_layers=4,
        num_decoder_layers=4,
    ),
    # A pretrained causal LM (the target itself by default) as the decoder; the T5 sizes unused.
    "prefix-lm": dict(decoder="causal", embed_hidden=2048, prefix_length=16),
    "base": dict(
        chunk_width=768,
        embed_hidden=768,
        d_model=768,
        d_ff=3072,
        d_kv=64,
        num_heads=12,
        num_layers=12,
        num_decoder_layers=12,
        dropout=0.1,
    ),
}


def new_t5(config: InverterConfig, vocab_size: int, pad: int, eos: int, start: int):
    """A T5 encoder-decoder of the config's sizes, initialised from scratch."""
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(
        T5Config(
            vocab_size=vocab_size,
            d_model=config.d_model,
            d_ff=config.d_ff,
            d_kv=config.d_kv,
            num_heads=config.num_heads,
            num_layers=config.num_layers,
            num_decoder_layers=config.num_decoder_layers,
            dropout_rate=config.dropout,
            pad_token_id=pad,
            eos_token_id=eos,
            decoder_start_token_id=start,
            feed_forward_proj=config.feed_forward_proj,
            tie_word_embeddings=config.tie_word_embeddings,
        )
    )
    if not config.tie_word_embeddings:
        # HF initialises an untied T5 head with std 1.0, so logits start with std
        # ~sqrt(d_model) and the loss near 50; std d_model**-0.5 starts it near ln(V)
        # and saves the first few hundred steps of a from-scratch run.
        nn.init.normal_(t5.lm_head.weight, std=config.d_model**-0.5)
    return t5


def decode_labels(t5, encoded: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor):
    """Teacher forcing: T5's decoder states `[B, T, d]` with `labels` (-100 padded) fed
    shifted right, attending to `encoded` under `mask`."""
    return t5.decoder(
        input_ids=t5._shift_right(labels),
        encoder_hidden_states=encoded,
        encoder_attention_mask=mask,
        use_cache=False,
    ).last_hidden_state


class CopyHead(nn.Module):
    """Output layer of a pointer-generator (See et al. 2017): the next token is generated from
    the vocabulary with probability p_gen, or copied from a neighbour prompt's tokens with
    probability 1 - p_gen, by an attention over the encoder states of those tokens.

    A retrieval-augmented inverter needs this to use its neighbours early in training: without
    it, copying a token means learning an identity map from 49k input embeddings to 49k output
    rows, one token at a time. `forward` returns log-probabilities, so it can stand in for
    T5's `lm_head` inside `generate` (beam search, sampling and logits processors unchanged).
    """

    def __init__(self, generate: nn.Linear, d_model: int):
        super().__init__()
        self.gen = generate  # the vocabulary projection (T5's own lm_head, tied or not)
        self.query = nn.Linear(d_model, d_model, bias=False)
        self.key = nn.Linear(d_model, d_model, bias=False)
        self.gate = nn.Linear(d_model, 1)
        self.context: tuple[torch.Tensor, torch.Tensor] | None = None  # set around generate

    @property
    def weight(self) -> torch.Tensor:
        return self.gen.weight

    @contextmanager
    def reading(self, encoded: torch.Tensor, copy_ids: torch.Tensor):
        """Let `forward` copy from these encoder states while the block runs (`generate`
        calls the head with decoder states only)."""
        self.context = (encoded, copy_ids)
        try:
            yield self
        finally:
            self.context = None

    def parts(self, hidden: torch.Tensor, encoded: torch.Tensor, copy_ids: torch.Tensor):
        """Copy attention `[B, T, L]` (zero off neighbour tokens) and the gate logit `[B, T]`.

        `copy_ids` `[B, L]`: the token id at each encoder position, -1 where nothing can be
        copied (pseudo-embeddings, padding).
        """
        scores = self.query(hidden) @ self.key(encoded).transpose(1, 2)
        scores = scores.float() * hidden.shape[-1] ** -0.5
        can = (copy_ids >= 0)[:, None, :]
        attn = torch.softmax(scores.masked_fill(~can, -1e9), -1) * can
        gate = self.gate(hidden).float()[..., 0]
        # Nothing to copy (no neighbour tokens): generate.
        gate = gate.masked_fill(~can.any(-1), 1e4)
        return attn, gate

    def mix(self, gen_logprobs, copy_probs, gate) -> torch.Tensor:
        """log(p_gen * generated + (1 - p_gen) * copied), in float32."""
        return torch.logaddexp(
            nn.functional.logsigmoid(gate) + gen_logprobs,
            nn.functional.logsigmoid(-gate) + torch.log(copy_probs + 1e-12),
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Log-probs over the vocabulary `[rows, T, V]` for `generate`, from `self.context`."""
        gen = torch.log_softmax(self.gen(hidden).float(), -1)
        if self.context is None:
            return gen
        encoded, copy_ids = self.context
        factor = hidden.shape[0] // encoded.shape[0]  # beams / samples per example
        if factor > 1:
            encoded = encoded.repeat_interleave(factor, 0)
            copy_ids = copy_ids.repeat_interleave(factor, 0)
        attn, gate = self.parts(hidden, encoded, copy_ids)
        copied = torch.zeros_like(gen).scatter_add_(
            2, copy_ids.clamp(min=0)[:, None, :].expand(-1, hidden.shape[1], -1), attn
        )
        return self.mix(gen, copied, gate[..., None])


class Inverter(nn.Module):
    """Maps next-token log-prob vectors to the prompts that produced them."""

    def __init__(
        self,
        config: InverterConfig,
        tokenizer=None,
        fingerprint: TargetFingerprint | None = None,
        decoder_config: dict | None = None,
    ):
        super().__init__()
        from transformers import T5ForConditionalGeneration

        if config.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}")
        if config.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, not {config.decoder!r}")
        if tokenizer is not None:
            _fill_token_ids(config, tokenizer)
        self.config = config
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint
        self.memory: NeighbourMemory | None = None
        self._memory_ids: list[list[int]] | None = None
        if config.decoder == "causal":
            self._init_causal(decoder_config)
            return
        if config.t5_init:
            self.t5 = T5ForConditionalGeneration.from_pretrained(config.t5_init)
            self.t5.resize_token_embeddings(config.output_vocab_size)
            # The checkpoint's sizes win over the preset, so from_pretrained(dir) rebuilds it.
            pre = self.t5.config
            config.d_model, config.d_ff, config.d_kv = pre.d_model, pre.d_ff, pre.d_kv
            config.num_heads, config.num_layers = pre.num_heads, pre.num_layers
            config.num_decoder_layers = pre.num_decoder_layers
            config.feed_forward_proj = pre.feed_forward_proj
            config.tie_word_embeddings = bool(pre.tie_word_embeddings)
            config.dropout = pre.dropout_rate
            for key in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
                setattr(pre, key, getattr(config, key))
        else:
            self.t5 = new_t5(
                config,
                config.output_vocab_size,
                config.pad_token_id,
                config.eos_token_id,
                config.decoder_start_token_id,
            )
        gen = self.t5.generation_config
        gen.pad_token_id, gen.eos_token_id = config.pad_token_id, config.eos_token_id
        gen.decoder_start_token_id = config.decoder_start_token_id
        self.embed = nn.Sequential(
            nn.Linear(config.chunk_width, config.embed_hidden),
            nn.Dropout(config.dropout),
            nn.GELU(),
            nn.Linear(config.embed_hidden, config.d_model),
        )
        # T5 has only relative positions; each chunk covers a fixed slice of the vocabulary,
        # so it also gets a learned absolute position.
        self.chunk_position = nn.Parameter(torch.zeros(config.seq_len, config.d_model))
        self.register_buffer("feature_mean", torch.zeros(config.dim))
        self.register_buffer("feature_std", torch.ones(config.dim))
        if config.neighbours:
            # Which neighbour (by rank) a prompt token belongs to, added to its embedding.
            self.neighbour_rank = nn.Parameter(torch.zeros(config.neighbours, config.d_model))
        if config.neighbours and config.neighbour_copy:
            self.t5.lm_head = CopyHead(self.t5.lm_head, config.d_model)

    def _init_causal(self, decoder_config: dict | None) -> None:
        config = self.config
        if config.neighbour_copy:
            raise ValueError(
                "a causal-LM decoder copies from its neighbours by attention; "
                "set neighbour_copy=False"
            )
        if config.subspace_dim < 1:
            raise ValueError("a causal-LM decoder needs subspace_dim >= 1 (the trainer fits it)")
        self.lm = load_causal_lm(config.decoder_init, decoder_config)
        vocab = self.lm.get_input_embeddings().weight
        if self.tokenizer is not None and len(self.tokenizer) > vocab.shape[0]:
            raise CheckpointError(
                f"the output tokenizer has {len(self.tokenizer)} tokens but the decoder LM "
                f"embeds {vocab.shape[0]}; use the decoder's own tokenizer"
            )
        gen = self.lm.generation_config
        gen.pad_token_id, gen.eos_token_id = config.pad_token_id, config.eos_token_id
        gen.bos_token_id = None
        hidden = vocab.shape[1]
        self.embed = nn.Sequential(
            nn.Linear(config.subspace_dim, config.embed_hidden),
            nn.Dropout(config.dropout),
            nn.GELU(),
            nn.Linear(config.embed_hidden, config.prefix_length * hidden),
        )
        self.register_buffer("basis", torch.zeros(config.dim, config.subspace_dim))
        self.register_buffer("feature_mean", torch.zeros(config.subspace_dim))
        self.register_buffer("feature_std", torch.ones(config.subspace_dim))
        # Prefix vectors get the mean norm of the LM's token embeddings: inputs of the size
        # it was trained on, whatever the MLP's output scale.
        self.register_buffer("prefix_norm", vocab.detach().float().norm(dim=1).mean())
        if config.neighbours:
            # Zero at first: the neighbours read as plain text, marked by rank as training goes.
            self.neighbour_rank = nn.Parameter(torch.zeros(config.neighbours, hidden))

    def with_neighbours(self, neighbours: int) -> Inverter:
        """A copy of this causal-decoder inverter that reads `neighbours` nearest training
        prompts (fine-tuning a plain prefix-lm into a retrieval-augmented one)."""
        if not self.causal:
            raise ValueError("only a causal-LM decoder can add neighbours to a trained inverter")
        config = replace(self.config, neighbours=neighbours, neighbour_copy=False)
        model = Inverter(config, self.tokenizer, self.fingerprint, self.lm.config.to_dict())
        # Rank embeddings (if any) restart at zero: their count changes.
        state = {k: v for k, v in self.state_dict().items() if k != "neighbour_rank"}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"neighbour_rank"}:
            raise CheckpointError(
                f"cannot carry the weights over: missing {missing}, unexpected {unexpected}"
            )
        return model

    @property
    def causal(self) -> bool:
        return self.config.decoder == "causal"

    # ------------------------------------------------------------------ features
    def set_feature_stats(
        self, mean: np.ndarray, std: np.ndarray, basis: np.ndarray | None = None
    ) -> None:
        """Feature mean/std (per vector entry; per subspace coordinate with a `basis`)."""
        if self.causal:
            if basis is None:
                raise ValueError("a causal-LM decoder's features need the subspace basis")
            self.basis.copy_(torch.as_tensor(basis))
        self.feature_mean.copy_(torch.as_tensor(mean))
        self.feature_std.copy_(torch.as_tensor(std))

    def encode_inputs(self, vectors: torch.Tensor) -> torch.Tensor:
        """Flat float32 `[B, dim]` log-probs -> pseudo-embeddings `[B, seq_len, d_model]`
        (causal decoder: the prefix `[B, prefix_length, hidden]`)."""
        x = vectors.to(self.feature_mean.device, torch.float32)
        if self.causal:
            coords = (
                centre(x, self.config.steps) @ self.basis - self.feature_mean
            ) / self.feature_std
            prefix = self.embed(coords.to(self.embed[0].weight.dtype))
            prefix = prefix.view(len(x), self.config.prefix_length, -1)
            return prefix * (self.prefix_norm / prefix.norm(dim=-1, keepdim=True).clamp(min=1e-6))
        if self.config.normalization != "none":
            x = x - self.feature_mean
        if self.config.normalization == "standardize":
            x = x / self.feature_std
        chunks = unroll(x, self.config.chunk_width)
        return self.embed(chunks.to(self.chunk_position.dtype)) + self.chunk_position

    def set_memory(self, memory: NeighbourMemory) -> None:
        """The training prompts a retrieval-augmented inverter reads beside each vector."""
        if not self.config.neighbours:
            raise CheckpointError("this inverter reads no neighbours (config.neighbours = 0)")
        self.memory, self._memory_ids = memory, None

    def neighbour_ids(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """Memory rows per example -> `[B, k, max_length]` token ids, padded with -1."""
        if self._memory_ids is None:
            self._memory_ids = encode_labels(
                self.tokenizer, self.memory.prompts, self.config.max_length
            )
        k, width = self.config.neighbours, self.config.max_length
        out = torch.full((len(rows), k, width), -1, dtype=torch.long)
        for b, row in enumerate(rows):
            for r, i in enumerate(list(row)[:k]):
                ids = self._memory_ids[i]
                out[b, r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def find_neighbours(self, vectors: torch.Tensor) -> torch.Tensor:
        """Nearest memory prompts of flat `[B, dim]` vectors as `neighbour_ids`."""
        if self.memory is None:
            raise CheckpointError(
                "this retrieval-augmented inverter has no neighbour memory; load it with "
                "from_pretrained or call set_memory"
            )
        return self.neighbour_ids(self.memory.search(vectors.cpu(), self.config.neighbours))

    def causal_context(
        self, vectors: torch.Tensor, neighbour_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The causal decoder's context and its mask: the neighbours' tokens (each ending
        with EOS, marked by rank), then the vector's prefix, left-padded so that every
        example's prompt starts right after its prefix."""
        prefix = self.encode_inputs(vectors)
        ones = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        if not self.config.neighbours:
            return prefix, ones
        if neighbour_ids is None:
            neighbour_ids = self.find_neighbours(vectors)
        ids = neighbour_ids.to(prefix.device)
        tokens = self.lm.get_input_embeddings()(ids.clamp(min=0)).to(prefix.dtype)
        tokens = (tokens + self.neighbour_rank[:, None].to(prefix.dtype)).flatten(1, 2)
        real = (ids >= 0).flatten(1)
        # Stable sort on "is real" moves each row's padding to the front, keeping token order.
        order = torch.sort(real.int(), dim=1, stable=True).indices
        width = max(int(real.sum(1).max()), 1)  # trim the common padding
        order = order[:, -width:]
        tokens = tokens.gather(1, order[..., None].expand(-1, -1, tokens.shape[-1]))
        real = real.gather(1, order)
        return torch.cat([tokens, prefix], 1), torch.cat([real.long(), ones], 1)

    def encoder_inputs(
        self, vectors: torch.Tensor, neighbour_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Encoder input embeddings, attention mask and (retrieval-augmented) the token id at
        each position (-1 where none): the vector's pseudo-embeddings, then the neighbours'
        tokens, each marked with its rank."""
        embeds = self.encode_inputs(vectors)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        if not self.config.neighbours:
            return embeds, mask, None
        if neighbour_ids is None:
            neighbour_ids = self.find_neighbours(vectors)
        ids = neighbour_ids.to(embeds.device)
        width = max(int((ids >= 0).sum(-1).max()), 1)  # trim the common padding
        ids = ids[..., :width]
        tokens = self.t5.shared(ids.clamp(min=0)) + self.neighbour_rank[:, None].to(embeds.dtype)
        tokens = tokens.to(embeds.dtype).flatten(1, 2)
        pseudo = torch.full(embeds.shape[:2], -1, dtype=torch.long, device=embeds.device)
        return (
            torch.cat([embeds, tokens], 1),
            torch.cat([mask, (ids >= 0).flatten(1).long()], 1),
            torch.cat([pseudo, ids.flatten(1)], 1),
        )

    def teacher_forced(
        self, vectors: torch.Tensor, labels: torch.Tensor, neighbour_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Encoder states, the decoder states the output layer reads (labels fed shifted
        right) and the copyable token id per encoder position."""
        embeds, mask, copy_ids = self.encoder_inputs(vectors, neighbour_ids)
        encoded = self.t5.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        decoded = decode_labels(self.t5, encoded, mask, labels)
        if getattr(self.t5.config, "scale_decoder_outputs", self.t5.config.tie_word_embeddings):
            decoded = decoded * (self.t5.config.d_model**-0.5)  # as T5 does with tied embeddings
        return encoded, decoded, copy_ids

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
        keep = labels != -100
        if self.causal:
            context, mask = self.causal_context(vectors, neighbour_ids)
            states = teacher_forced_states(self.lm, context, labels, mask)
            logits = self.lm.get_output_embeddings()(states[keep]).float()
            nll = nn.functional.cross_entropy(logits, labels[keep], reduction="none")
            return self._reduce(nll, keep, per_example)
        encoded, decoded, copy_ids = self.teacher_forced(vectors, labels, neighbour_ids)
        head = self.t5.lm_head
        if not isinstance(head, CopyHead):
            logits = head(decoded[keep]).float()
            nll = nn.functional.cross_entropy(logits, labels[keep], reduction="none")
        else:
            gen = torch.log_softmax(head.gen(decoded[keep]).float(), -1)
            gen = gen.gather(1, labels[keep][:, None])[:, 0]
            attn, gate = head.parts(decoded, encoded, copy_ids)
            # Probability of copying the label token: attention on positions holding it.
            hit = copy_ids[:, None, :] == labels[:, :, None]
            copied = (attn * hit).sum(-1)[keep]
            nll = -head.mix(gen, copied, gate[keep])
        return self._reduce(nll, keep, per_example)

    @staticmethod
    def _reduce(nll: torch.Tensor, keep: torch.Tensor, per_example: bool) -> torch.Tensor:
        if not per_example:
            return nll.sum()
        rows = keep.nonzero()[:, 0]
        return torch.zeros(len(keep), device=nll.device).index_add_(0, rows, nll)

    @torch.no_grad()
    def label_logprobs(
        self, vectors: torch.Tensor, labels: torch.Tensor, neighbour_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Log-probs over the output vocabulary `[B, T, V]` at every position of `labels`
        (padded with -100), each given the vector and the labels before it (and the
        neighbours: `neighbour_ids`, or the memory's nearest)."""
        if self.causal:
            context, mask = self.causal_context(vectors, neighbour_ids)
            states = teacher_forced_states(self.lm, context, labels, mask)
            return torch.log_softmax(self.lm.get_output_embeddings()(states).float(), -1)
        encoded, decoded, copy_ids = self.teacher_forced(vectors, labels, neighbour_ids)
        head = self.t5.lm_head
        if not isinstance(head, CopyHead):
            return torch.log_softmax(head(decoded).float(), -1)
        with head.reading(encoded, copy_ids):
            return head(decoded)

    # ------------------------------------------------------------------ inversion
    def as_batch(self, logprobs) -> torch.Tensor:
        """Validated float32 `[B, steps * vocab]` from `[vocab]`, `[B, vocab]` or
        `[B, steps, vocab]` (VectorError on a wrong shape or NaN/inf)."""
        x = torch.as_tensor(np.asarray(logprobs) if not torch.is_tensor(logprobs) else logprobs)
        shape = (
            (self.config.steps, self.config.vocab_size)
            if self.config.steps > 1
            else (self.config.vocab_size,)
        )
        if x.dim() == len(shape):
            x = x.unsqueeze(0)
        if self.config.steps == 1 and x.dim() == 3 and x.shape[1] == 1:
            x = x[:, 0]
        described = self.fingerprint.describe() if self.fingerprint else "its training target"
        return check_vectors(x, shape, described)

    @torch.inference_mode()
    def generate_ids(
        self, vectors: torch.Tensor, neighbour_ids: torch.Tensor | None = None, **generate_kwargs
    ) -> torch.Tensor:
        """Output token ids for flat vectors (retrieval-augmented: reading `neighbour_ids`,
        or the memory's nearest prompts); keyword arguments go to `generate`."""
        from transformers.modeling_outputs import BaseModelOutput

        if self.causal:
            context, mask = self.causal_context(vectors, neighbour_ids)
            kwargs = {"max_new_tokens": self.config.max_length, **generate_kwargs}
            # With only inputs_embeds, generate returns just the new tokens; it derives the
            # positions from the mask, as teacher_forced_states does.
            return self.lm.generate(inputs_embeds=context, attention_mask=mask, **kwargs)
        embeds, mask, copy_ids = self.encoder_inputs(vectors, neighbour_ids)
        encoded = self.t5.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        kwargs = {"max_new_tokens": self.config.max_length, **generate_kwargs}
        head = self.t5.lm_head
        with head.reading(encoded, copy_ids) if isinstance(head, CopyHead) else nullcontext():
            return self.t5.generate(
                encoder_outputs=BaseModelOutput(last_hidden_state=encoded),
                attention_mask=mask,
                **kwargs,
            )

    def ensure_fingerprint(self, fingerprint: TargetFingerprint | None) -> None:
        """VectorError naming both targets if vectors from `fingerprint` are not this
        inverter's (nothing to check when either is unknown)."""
        if fingerprint is not None and self.fingerprint is not None:
            diffs = self.fingerprint.differences(fingerprint)
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
        top_p: float = 1.0,
        no_repeat_ngram_size: int = 0,
        batch_size: int = 64,
        fingerprint: TargetFingerprint | None = None,
        bf16: bool = False,
        grouped: bool = False,
    ) -> list[str] | list[list[str]]:
        """Recover prompts from log-prob vectors `[vocab]`, `[B, vocab]` or `[B, steps, vocab]`.

        Returns one string per vector, or a list of `num_return_sequences` strings per vector
        (always a list per vector with `grouped`, so callers need not special-case one).
        A `fingerprint` that differs from the checkpoint's target is refused. `bf16` decodes
        under bf16 autocast (faster; benchmarks/decode_precision.py measures what it costs).
        """
        if self.tokenizer is None:
            raise CheckpointError(
                "this inverter has no output tokenizer; load it from a checkpoint"
            )
        self.ensure_fingerprint(fingerprint)
        x = self.as_batch(logprobs)
        was_training = self.training
        self.eval()
        kwargs = {
            "num_beams": max(num_beams, num_return_sequences) if not do_sample else 1,
            "num_return_sequences": num_return_sequences,
            "do_sample": do_sample,
        }
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        if no_repeat_ngram_size:
            # An undertrained inverter loops ("the remaining the remaining ..."); blocking
            # repeated n-grams is the usual seq2seq remedy.
            kwargs["no_repeat_ngram_size"] = no_repeat_ngram_size
        device = self.feature_mean.device.type
        precision = torch.autocast(device, dtype=torch.bfloat16) if bf16 else nullcontext()
        texts: list[str] = []
        for start in range(0, len(x), batch_size):
            with precision:
                ids = self.generate_ids(x[start : start + batch_size], **kwargs)
            texts.extend(self.tokenizer.batch_decode(ids, skip_special_tokens=True))
        self.train(was_training)
        texts = [t.strip() for t in texts]
        if num_return_sequences == 1 and not grouped:
            return texts
        k = num_return_sequences
        return [texts[i : i + k] for i in range(0, len(texts), k)]

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, directory: str | Path, training_args: dict | None = None) -> None:
        """Write weights (safetensors), config, tokenizer, fingerprint and training args."""
        from safetensors.torch import save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_model(
            self,
            str(directory / WEIGHTS_NAME),
            metadata={"format": CHECKPOINT_FORMAT, "version": str(CHECKPOINT_VERSION)},
        )
        (directory / CONFIG_NAME).write_text(
            json.dumps(
                {
                    "format": CHECKPOINT_FORMAT,
                    "version": CHECKPOINT_VERSION,
                    **self.config.to_dict(),
                },
                indent=1,
            )
        )
        if self.fingerprint is not None:
            (directory / FINGERPRINT_NAME).write_text(
                json.dumps(self.fingerprint.to_dict(), indent=1)
            )
        if training_args is not None:
            (directory / TRAINING_ARGS_NAME).write_text(json.dumps(training_args, indent=1))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        if self.causal:
            (directory / DECODER_CONFIG_NAME).write_text(self.lm.config.to_json_string())
        if self.memory is not None:
            self.memory.save(directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | None = None) -> Inverter:
        """Load a checkpoint written by `save_pretrained`; CheckpointError if foreign/corrupt."""
        from safetensors import SafetensorError
        from safetensors.torch import load_model
        from transformers import AutoTokenizer

        directory = Path(directory)
        config_file = directory / CONFIG_NAME
        if not config_file.is_file():
            raise CheckpointError(
                f"{directory} is not a logit2prompt inverter checkpoint (no {CONFIG_NAME})"
            )
        try:
            raw = json.loads(config_file.read_text())
        except ValueError as exc:
            raise CheckpointError(f"{config_file} is corrupted: {exc}") from exc
        if raw.pop("format", None) != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{directory} is not a logit2prompt inverter checkpoint")
        version = raw.pop("version", None)
        if version != CHECKPOINT_VERSION:
            raise CheckpointError(
                f"{directory} has checkpoint version {version}; this "
                f"logit2prompt reads version {CHECKPOINT_VERSION}"
            )
        config = InverterConfig.from_dict(raw)
        config.t5_init = None  # the weights below replace any pretrained init
        decoder_config = None
        if config.decoder == "causal":
            try:
                decoder_config = json.loads((directory / DECODER_CONFIG_NAME).read_text())
            except (OSError, ValueError) as exc:
                raise CheckpointError(
                    f"{directory}: decoder config missing or corrupted: {exc}"
                ) from exc
        fingerprint = None
        if (directory / FINGERPRINT_NAME).is_file():
            fingerprint = TargetFingerprint.from_dict(
                json.loads((directory / FINGERPRINT_NAME).read_text())
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{directory}: output tokenizer unreadable: {exc}") from exc
        model = cls(config, tokenizer, fingerprint, decoder_config)
        try:
            missing, unexpected = load_model(model, str(directory / WEIGHTS_NAME), strict=False)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(
                f"{directory / WEIGHTS_NAME} is missing or corrupted: {exc}"
            ) from exc
        if missing or unexpected:
            raise CheckpointError(
                f"{directory / WEIGHTS_NAME} does not match its config: "
                f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        if config.neighbours:
            memory = NeighbourMemory.load(directory)
            if len(memory.buckets) != config.dim:
                raise CheckpointError(
                    f"{directory}: the neighbour memory sketches vectors of "
                    f"{len(memory.buckets)} entries but the inverter reads {config.dim}"
                )
            model.set_memory(memory)
        if device:
            model.to(device)
        return model.eval()


def _fill_token_ids(config: InverterConfig, tokenizer) -> None:
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


def encode_labels(tokenizer, prompts: Sequence[str], max_length: int) -> list[list[int]]:
    """Target token ids of each prompt, truncated, ending with EOS."""
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [x[: max_length - 1] + [eos] for x in ids]


def pad_labels(labels: Sequence[Sequence[int]]) -> torch.Tensor:
    """Right-pad label id lists with -100 (ignored by the loss) into a `[batch, width]` tensor."""
    padded = torch.full((len(labels), max(len(x) for x in labels)), -100, dtype=torch.long)
    for row, x in enumerate(labels):
        padded[row, : len(x)] = torch.tensor(x, dtype=torch.long)
    return padded
