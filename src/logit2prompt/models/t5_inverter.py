"""The paper's inverter (Morris et al. 2023): log-prob vector -> chunks -> MLP ->
pseudo-embeddings -> T5 encoder-decoder -> prompt.

A retrieval-augmented variant (`neighbours > 0`, not in the paper) also feeds the encoder the
token embeddings of the nearest training prompts, optionally with a pointer-generator output
(`CopyHead`) that copies tokens from them.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from torch import nn

from ..targets.base import TargetFingerprint
from .config import T5InverterConfig
from .features import unroll
from .inverter import Inverter, pack_neighbours


def new_t5(config: T5InverterConfig, vocab_size: int, pad: int, eos: int, start: int):
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
        # Unscaled decoder outputs through an output layer of std 1.0 start the logits with
        # std ~sqrt(d_model) and the loss near 50; std d_model**-0.5 starts it near ln(V)
        # and saves the first few hundred steps of a from-scratch run. (The layer is the
        # tied input embedding in transformers 5.)
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


class T5Inverter(Inverter):
    """Chunked log-prob vector -> pseudo-embeddings -> T5 encoder-decoder -> prompt."""

    config: T5InverterConfig

    def __init__(
        self,
        config: T5InverterConfig,
        tokenizer=None,
        fingerprint: TargetFingerprint | None = None,
    ):
        super().__init__(config, tokenizer, fingerprint)
        from transformers import T5ForConditionalGeneration

        if config.t5_init:
            self.t5 = T5ForConditionalGeneration.from_pretrained(config.t5_init)
            self.t5.resize_token_embeddings(config.output_vocab_size)
            # The checkpoint's sizes win over the preset, so from_pretrained(dir) rebuilds it.
            pre = self.t5.config
            config.d_model, config.d_ff, config.d_kv = pre.d_model, pre.d_ff, pre.d_kv
            config.num_heads, config.num_layers = pre.num_heads, pre.num_layers
            config.num_decoder_layers = pre.num_decoder_layers
            config.feed_forward_proj = pre.feed_forward_proj
            # transformers 5 reads a config's tie_word_embeddings as "scale the decoder
            # output" (False in t5-v1.1/flan-t5) and always ties: record what it means.
            config.tie_word_embeddings = bool(
                getattr(pre, "scale_decoder_outputs", pre.tie_word_embeddings)
            )
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
        # so it also gets a learned absolute position (the same in every step).
        self.chunk_position = nn.Parameter(torch.zeros(config.chunks_per_step, config.d_model))
        if config.step_positions:
            self.step_embedding = nn.Parameter(torch.zeros(config.step_positions, config.d_model))
        # Statistics per vocabulary entry, shared by all steps (so any number of steps reads).
        self.register_buffer("feature_mean", torch.zeros(config.input_width))
        self.register_buffer("feature_std", torch.ones(config.input_width))
        if config.neighbours:
            # Which neighbour (by rank) a prompt token belongs to, added to its embedding.
            self.neighbour_rank = nn.Parameter(torch.zeros(config.neighbours, config.d_model))
        if config.neighbours and config.neighbour_copy:
            self.t5.lm_head = CopyHead(self.t5.lm_head, config.d_model)

    # ------------------------------------------------------------------ features
    def set_feature_stats(
        self, mean: np.ndarray, std: np.ndarray, basis: np.ndarray | None = None
    ) -> None:
        """Feature mean/std per vocabulary entry `[vocab]`, shared by all steps (`basis` is for
        the prefix-lm; ignored here)."""
        self.feature_mean.copy_(torch.as_tensor(mean))
        self.feature_std.copy_(torch.as_tensor(std))

    def encode_inputs(self, vectors: torch.Tensor) -> torch.Tensor:
        """Flat float32 `[B, k * vocab]` log-probs of k steps -> pseudo-embeddings
        `[B, k * chunks_per_step, d_model]` (each step unrolled into its own chunks)."""
        k = self.steps_of(vectors)
        x = vectors.to(self.feature_mean.device, torch.float32).reshape(len(vectors) * k, -1)
        if self.config.normalization != "none":
            x = x - self.feature_mean
        if self.config.normalization == "standardize":
            x = x / self.feature_std
        chunks = unroll(x, self.config.chunk_width)  # [B * k, chunks_per_step, width]
        embeds = self.embed(chunks.to(self.chunk_position.dtype)) + self.chunk_position
        embeds = embeds.view(len(vectors), k, *embeds.shape[1:])
        if self.config.step_positions:
            embeds = embeds + self.step_embedding[:k, None].to(embeds.dtype)
        return embeds.flatten(1, 2)

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
        tokens = self.t5.shared(ids.clamp(min=0)) + self.neighbour_rank[:, None].to(embeds.dtype)
        tokens = tokens.to(embeds.dtype).flatten(1, 2)
        # Each row's neighbours packed together: T5's relative positions then never count
        # padding that depends on the other rows of the batch.
        order, real = pack_neighbours(ids, pad_left=False)
        tokens = tokens.gather(1, order[..., None].expand(-1, -1, tokens.shape[-1]))
        pseudo = torch.full(embeds.shape[:2], -1, dtype=torch.long, device=embeds.device)
        return (
            torch.cat([embeds, tokens], 1),
            torch.cat([mask, real.long()], 1),
            torch.cat([pseudo, ids.flatten(1).gather(1, order)], 1),
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

    # ------------------------------------------------------------------ loss and decoding
    def forward(
        self,
        vectors: torch.Tensor,
        labels: torch.Tensor,
        neighbour_ids: torch.Tensor | None = None,
        per_example: bool = False,
    ) -> torch.Tensor:
        keep = labels != -100
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

    forward.__doc__ = Inverter.forward.__doc__

    @torch.no_grad()
    def label_logprobs(
        self, vectors: torch.Tensor, labels: torch.Tensor, neighbour_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        encoded, decoded, copy_ids = self.teacher_forced(vectors, labels, neighbour_ids)
        head = self.t5.lm_head
        if not isinstance(head, CopyHead):
            return torch.log_softmax(head(decoded).float(), -1)
        with head.reading(encoded, copy_ids):
            return head(decoded)

    # no_grad, not inference_mode: under inference_mode autocast caches no weight cast, and
    # bf16 decoding then re-casts every weight at every step (Inverter._bf16_autocast).
    @torch.no_grad()
    def generate_ids(
        self, vectors: torch.Tensor, neighbour_ids: torch.Tensor | None = None, **generate_kwargs
    ) -> torch.Tensor:
        from transformers.modeling_outputs import BaseModelOutput

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
