"""The prefix-lm inverter (not in the paper; preset `prefix-lm`): a pretrained causal LM as the
inverter's decoder.

The paper starts from a pretrained T5; none is available offline, and a T5 trained from scratch
on a CPU budget never learns enough English to beat retrieval. The target itself is a pretrained
LM that is always at hand, so the inverter can read the vector as a *prefix* of pseudo-token
embeddings in front of the prompt and let that LM write the prompt (as ClipCap does for images):

    log-probs of each step -> centre over the vocabulary -> project on the principal
    directions of the training steps (PILS: they span only hidden-size dimensions; one basis
    for every step) -> standardise -> MLP -> `tokens_per_step` embeddings per step, plus a
    learned step embedding -> causal LM -> prompt tokens

With K steps (the greedy continuation's distributions, PILS) the prefix has K x
tokens_per_step pseudo-tokens; the default keeps it at `prefix_length` (16) for the trained K,
and inversion may read more steps than training did (test-time extension).

The projection is lossless for the full vectors of a softmax LM (Nazir et al. 2025) and turns a
49k-entry vector into a few hundred coordinates.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer

from ..errors import CheckpointError, VectorError
from ..targets.base import TargetFingerprint
from .config import PrefixLMConfig
from .inverter import Inverter, pack_neighbours

DECODER_CONFIG_NAME = "decoder_config.json"  # architecture of the decoder LM (no download)
# The decoder's projections that get LoRA adapters (Llama-style names; peft matches suffixes).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# The centred vectors of a softmax LM span hidden-size directions; beyond them the spectrum is
# a flat floor of rounding noise (bf16 target, fp16 store). When the sample is over twice the
# rank, the median singular value sits on that floor, and directions above FLOOR_FACTOR times it
# are signal (SmolLM2-135M, hidden size 576: the quality run fitted 576).
FLOOR_FACTOR = 2.0
REL_TOL = 1e-6  # exact-arithmetic zeros, when there is no noise floor at all


def centre(x: torch.Tensor, steps: int) -> torch.Tensor:
    """Subtract each distribution's mean over the vocabulary: log-softmax's normaliser is
    the same for every token, so it carries nothing but leaves the vector off the subspace."""
    rows = x.reshape(len(x), steps, -1)
    return (rows - rows.mean(-1, keepdim=True)).reshape(len(x), -1)


# Columns of the vectors turned into float64 at a time by fit_subspace: a 4,096-row sample of
# 49k-entry vectors is 0.8 GB in float32, and a whole float64 copy of it (as before) 1.6 GB more.
FIT_CHUNK = 4096


def fit_subspace(
    vectors: np.ndarray, steps: int, dims: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Principal directions of centred training vectors `[n, steps * vocab]` (float32).

    Returns (basis `[dim, r]`, coordinate mean `[r]`, coordinate std `[r]`, singular values).
    `dims` = 0 keeps the directions above the noise floor (see `FLOOR_FACTOR`). A writeable
    float32 array is centred in place (it is the caller's sample, read for this); the float64
    sums run over FIT_CHUNK columns at a time, so memory stays near the sample's own size.
    """
    array = np.asarray(vectors, dtype=np.float32)
    if not array.flags.writeable:  # e.g. a read-only memmap: centre a copy
        array = array.copy()
    x = torch.as_tensor(array)
    if len(x) < 2:
        raise VectorError("need at least 2 training vectors to fit the subspace")
    rows = x.view(len(x), steps, -1)
    rows -= rows.mean(-1, keepdim=True)  # centre(), in place
    # Eigen-decomposition of the n x n Gram matrix: n (thousands) << dim (the vocabulary).
    gram = torch.zeros(len(x), len(x), dtype=torch.float64)
    for c in range(0, x.shape[1], FIT_CHUNK):
        part = x[:, c : c + FIT_CHUNK].double()
        gram.addmm_(part, part.T)
    evals, evecs = torch.linalg.eigh(gram)
    del gram
    evals, evecs = evals.flip(0).clamp(min=0), evecs.flip(1)
    sing = evals.sqrt()
    floor = max(FLOOR_FACTOR * float(sing.median()), REL_TOL * float(sing[0]))
    rank = int((sing > floor).sum())
    r = min(dims, len(x)) if dims else rank
    if r < 1:
        raise VectorError("the training vectors are all constant; no subspace to project on")
    scaled = evecs[:, :r] / sing[:r].clamp(min=1e-12)
    basis = torch.empty(x.shape[1], r, dtype=torch.float32)
    coords = torch.zeros(len(x), r, dtype=torch.float64)
    for c in range(0, x.shape[1], FIT_CHUNK):
        part = x[:, c : c + FIT_CHUNK].double()
        block = part.T @ scaled
        basis[c : c + FIT_CHUNK] = block.float()
        coords.addmm_(part, block)
    mean, std = coords.mean(0), coords.std(0).clamp(min=1e-6)
    as_np = lambda t: t.float().numpy()  # noqa: E731
    return basis.numpy(), as_np(mean), as_np(std), as_np(sing)


def load_causal_lm(init: str | None, config: dict | None = None):
    """The decoder LM: pretrained weights from `init` (hub id or directory), or an empty model
    of `config` (a checkpoint's own copy; its weights come from the checkpoint)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if config is not None:
        cfg = dict(config)
        model_type = cfg.pop("model_type", None)
        if model_type is None:
            raise CheckpointError("the decoder config in this checkpoint has no model_type")
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg))
    if not init:
        raise CheckpointError("a causal decoder needs decoder_init (a hub id or directory)")
    from ..targets.embedded import target_weights

    try:
        # A built-in target's name (a slim checkpoint's portable decoder_init) resolves here.
        return AutoModelForCausalLM.from_pretrained(target_weights(init), dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load the decoder LM {init!r}: {exc}") from exc


def add_adapters(lm, rank: int, alpha: float) -> None:
    """Freeze every weight of `lm` and inject LoRA adapters (peft) of `rank` into its
    projections, in place: `lm` stays the same module, so the code that calls it is unchanged
    and the adapters' weights are ordinary entries of the state dict."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = [t for t in LORA_TARGETS if any(n.endswith(t) for n, _ in lm.named_modules())]
    if not targets:
        raise CheckpointError(
            f"lora_rank {rank}: the decoder {type(lm).__name__} has none of the projections "
            f"{', '.join(LORA_TARGETS)}; train it without adapters (lora_rank 0)"
        )
    lm.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, target_modules=targets)
    inject_adapter_in_model(config, lm)  # leaves only the adapters trainable


@contextmanager
def merged_adapters(lm):
    """`lm` with every LoRA adapter folded into its projection (one matmul per projection
    instead of three, and fewer casts under autocast), its exact pretrained weights put back
    after (merged into a copy, not merged and subtracted again)."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in lm.modules() if isinstance(m, LoraLayer) and not m.merged]
    saved = [m.get_base_layer().weight.data for m in layers]
    device = saved[0].device.type if saved else "cpu"
    with torch.autocast(device, enabled=False):  # fold in float32, not in autocast's bf16
        for m in layers:
            weight = m.get_base_layer().weight
            weight.data = weight.data.clone()
            m.merge()
    # A cast autocast cached before (inside the same context) is of the unmerged weight.
    torch.clear_autocast_cache()
    try:
        yield lm
    finally:
        with torch.autocast(device, enabled=False):
            for m, data in zip(layers, saved, strict=True):
                m.unmerge()  # marks it unmerged; the copy it subtracts from is dropped
                m.get_base_layer().weight.data = data
        torch.clear_autocast_cache()


def nucleus(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens a sampler may draw and their unnormalised probabilities `[B, K]` (most
    likely first), as transformers' warpers leave them: logits / temperature, the `top_k`
    most likely (0: all), then the fewest of those whose mass reaches `top_p` (1: all)."""
    scores = logits.float() / temperature
    if 0 < top_k < scores.shape[-1]:
        scores, index = scores.topk(top_k, -1)  # sorted: no sort of the whole vocabulary
    else:
        scores, index = scores.sort(-1, descending=True)
    probs = scores.softmax(-1)
    if top_p < 1:
        above = probs.cumsum(-1) - probs  # the mass ranked above each token
        probs = probs.masked_fill(above >= top_p, 0.0)  # the first token always stays
    return probs, index


def draw(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """One token per row of `logits`, sampled from its `nucleus`."""
    probs, index = nucleus(logits, temperature, top_k, top_p)
    return index.gather(-1, torch.multinomial(probs, 1)).squeeze(-1)


# generate() arguments the decoder's own sampling loop (PrefixLMInverter.sample_ids) handles.
SAMPLING_ARGS = {"do_sample", "num_beams", "num_return_sequences", "temperature", "top_k", "top_p"}


class _ReadOnlyCache(DynamicCache):
    """A KV cache that, once `frozen`, is read without being written: each layer returns the
    cached keys and values followed by the new ones. A gradient-checkpointed layer can then
    replay its forward in the backward pass on the same cache."""

    frozen = False

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if not self.frozen:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]
        return (
            torch.cat([layer.keys, key_states], -2),
            torch.cat([layer.values, value_states], -2),
        )


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding, as `generate` derives them from the attention mask:
    a left-padded context then reads the same positions in training and in generation."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def teacher_forced_states(
    lm,
    context: torch.Tensor,
    labels: torch.Tensor,
    context_mask: torch.Tensor | None = None,
    past: tuple[DynamicCache, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Hidden states `[B, T, H]` that predict `labels` `[B, T]` (-100 padded): the context's
    last position predicts the first label, each label position the next. `context_mask`
    marks the real positions of a left-padded context (default: all real). `past` is the
    KV cache of what comes before the context and its mask."""
    ids = labels.clamp(min=0)
    tokens = lm.get_input_embeddings()(ids).to(context.dtype)
    embeds = torch.cat([context, tokens], 1)
    k = context.shape[1]
    if context_mask is None:
        context_mask = torch.ones(context.shape[:2], dtype=torch.long, device=context.device)
    cache, past_mask = past if past is not None else (None, context_mask[:, :0])
    mask = torch.cat([past_mask.long(), context_mask.long(), (labels != -100).long()], 1)
    # Right padding of the labels with an explicit mask: padded positions are never read by
    # real ones.
    hidden = lm.base_model(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=positions(mask)[:, past_mask.shape[1] :],
        cache=cache,
    ).last_hidden_state
    return hidden[:, k - 1 : k - 1 + labels.shape[1]]


class PrefixLMInverter(Inverter):
    """Subspace coordinates of the vector -> MLP -> `prefix_length` pseudo-token embeddings ->
    a pretrained causal LM that continues with the prompt (and, retrieval-augmented, reads the
    nearest training prompts as text before the prefix)."""

    config: PrefixLMConfig

    def __init__(
        self,
        config: PrefixLMConfig,
        tokenizer=None,
        fingerprint: TargetFingerprint | None = None,
        decoder_config: dict | None = None,
    ):
        super().__init__(config, tokenizer, fingerprint)
        if config.subspace_dim < 1:
            raise ValueError("a causal-LM decoder needs subspace_dim >= 1 (the trainer fits it)")
        self.lm = load_causal_lm(config.decoder_init, decoder_config)
        vocab = self.lm.get_input_embeddings().weight
        if self.tokenizer is not None and len(self.tokenizer) > vocab.shape[0]:
            raise CheckpointError(
                f"the output tokenizer has {len(self.tokenizer)} tokens but the decoder LM "
                f"embeds {vocab.shape[0]}; use the decoder's own tokenizer"
            )
        if config.lora_rank:
            add_adapters(self.lm, config.lora_rank, config.lora_alpha)
        if config.detach_neighbours:
            # The neighbours' cache is read-only (_ReadOnlyCache), so a checkpointed layer
            # may keep it when it replays its forward.
            for layer in self.lm.modules():
                if isinstance(layer, GradientCheckpointingLayer):
                    layer._can_checkpoint_with_cache = True
        gen = self.lm.generation_config
        gen.pad_token_id, gen.eos_token_id = config.pad_token_id, config.eos_token_id
        gen.bos_token_id = None
        hidden = vocab.shape[1]
        # Text-only (no pseudo-tokens): no MLP and no step rows, so nothing sits unused.
        self.embed = (
            nn.Sequential(
                nn.Linear(config.subspace_dim, config.embed_hidden),
                nn.Dropout(config.dropout),
                nn.GELU(),
                nn.Linear(config.embed_hidden, config.tokens_per_step * hidden),
            )
            if config.pseudo_tokens
            else None
        )
        if config.step_positions and config.pseudo_tokens:
            # Zero at first (the LM's own positions order the steps); rows of steps never
            # trained on stay zero, so test-time extension reads them as plain steps.
            self.step_embedding = nn.Parameter(torch.zeros(config.step_positions, hidden))
        # One basis for every step: all steps' log-probs lie in the same subspace.
        self.register_buffer("basis", torch.zeros(config.input_width, config.subspace_dim))
        self.register_buffer("feature_mean", torch.zeros(config.subspace_dim))
        self.register_buffer("feature_std", torch.ones(config.subspace_dim))
        # Prefix vectors get the mean norm of the LM's token embeddings: inputs of the size
        # it was trained on, whatever the MLP's output scale.
        self.register_buffer("prefix_norm", vocab.detach().float().norm(dim=1).mean())
        if config.neighbours:
            # Zero at first: the neighbours read as plain text, marked by rank as training goes.
            self.neighbour_rank = nn.Parameter(torch.zeros(config.neighbours, hidden))
            # Detached neighbours give it no gradient: frozen, so no process waits for one.
            self.neighbour_rank.requires_grad_(not config.detach_neighbours)

    def with_neighbours(self, neighbours: int) -> PrefixLMInverter:
        """A copy of this inverter that reads `neighbours` nearest training prompts
        (fine-tuning a plain prefix-lm into a retrieval-augmented one)."""
        config = replace(self.config, neighbours=neighbours)
        model = PrefixLMInverter(config, self.tokenizer, self.fingerprint, self.lm.config.to_dict())
        # Rank embeddings (if any) restart at zero: their count changes.
        state = {k: v for k, v in self.state_dict().items() if k != "neighbour_rank"}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"neighbour_rank"}:
            raise CheckpointError(
                f"cannot carry the weights over: missing {missing}, unexpected {unexpected}"
            )
        return model

    def save_extra(self, directory: Path) -> None:
        """The decoder's architecture, so loading needs no download."""
        (directory / DECODER_CONFIG_NAME).write_text(self.lm.config.to_json_string())

    # ------------------------------------------------------------------ features
    def set_feature_stats(
        self, mean: np.ndarray, std: np.ndarray, basis: np.ndarray | None = None
    ) -> None:
        """The subspace `basis` `[dim, r]` and the coordinates' mean/std."""
        if basis is None:
            raise ValueError("a causal-LM decoder's features need the subspace basis")
        self.basis.copy_(torch.as_tensor(basis))
        self.feature_mean.copy_(torch.as_tensor(mean))
        self.feature_std.copy_(torch.as_tensor(std))

    def encode_inputs(self, vectors: torch.Tensor) -> torch.Tensor:
        """Flat float32 `[B, k * vocab]` log-probs of k steps -> the prefix
        `[B, k * tokens_per_step, hidden]` (one more position per step with `reply_tokens`)."""
        k = self.steps_of(vectors)
        x = vectors.to(self.feature_mean.device, torch.float32).reshape(len(vectors), k, -1)
        # Each step's argmax (the greedy reply's token), as the decoder embeds it.
        words = self.lm.get_input_embeddings()(x.argmax(-1)) if self.config.reply_tokens else None
        if self.embed is None:  # text-only: the reply is the whole prefix
            return words
        x = x - x.mean(-1, keepdim=True)  # see centre()
        coords = (x @ self.basis - self.feature_mean) / self.feature_std  # [B, k, r]
        prefix = self.embed(coords.to(self.embed[0].weight.dtype))
        prefix = prefix.view(len(x), k, self.config.tokens_per_step, -1)
        if self.config.step_positions:
            prefix = prefix + self.step_embedding[:k, None].to(prefix.dtype)
        prefix = prefix * (self.prefix_norm / prefix.norm(dim=-1, keepdim=True).clamp(min=1e-6))
        if words is not None:
            prefix = torch.cat([words.to(prefix.dtype)[:, :, None], prefix], 2)
        return prefix.flatten(1, 2)

    def causal_context(
        self, vectors: torch.Tensor, neighbour_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's context and its mask: the neighbours' tokens (each ending with EOS,
        marked by rank), then the vector's prefix, left-padded so that every example's prompt
        starts right after its prefix."""
        prefix = self.encode_inputs(vectors)
        ones = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        if not self.config.neighbours:
            return prefix, ones
        tokens, real = self.neighbour_context(vectors, neighbour_ids, prefix.dtype)
        return torch.cat([tokens, prefix], 1), torch.cat([real, ones], 1)

    def neighbour_context(
        self, vectors: torch.Tensor, neighbour_ids: torch.Tensor | None, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The neighbours' token embeddings `[B, W, H]` (marked by rank, left-padded to the
        longest row) and their mask `[B, W]`."""
        if neighbour_ids is None:
            neighbour_ids = self.find_neighbours(vectors)
        ids = neighbour_ids.to(self.basis.device)
        tokens = self.lm.get_input_embeddings()(ids.clamp(min=0)).to(dtype)
        tokens = (tokens + self.neighbour_rank[:, None].to(dtype)).flatten(1, 2)
        order, real = pack_neighbours(ids, pad_left=True)
        tokens = tokens.gather(1, order[..., None].expand(-1, -1, tokens.shape[-1]))
        return tokens, real.long()

    def _states_after_detached_neighbours(
        self, vectors: torch.Tensor, labels: torch.Tensor, neighbour_ids: torch.Tensor | None
    ) -> torch.Tensor:
        """teacher_forced_states of the whole context, with the neighbours' keys and values
        computed first without gradients (config.detach_neighbours): the same values, a
        backward pass only over the prefix and the prompt."""
        prefix = self.encode_inputs(vectors)
        with torch.no_grad():
            tokens, real = self.neighbour_context(vectors, neighbour_ids, prefix.dtype)
            cache = _ReadOnlyCache(config=self.lm.config)
            self.lm.base_model(
                inputs_embeds=tokens,
                attention_mask=real,
                position_ids=positions(real),
                cache=cache,
                use_cache=True,
            )
        cache.frozen = True
        ones = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        return teacher_forced_states(self.lm, prefix, labels, ones, past=(cache, real))

    # ------------------------------------------------------------------ loss and decoding
    def forward(
        self,
        vectors: torch.Tensor,
        labels: torch.Tensor,
        neighbour_ids: torch.Tensor | None = None,
        per_example: bool = False,
    ) -> torch.Tensor:
        keep = labels != -100
        if self.config.detach_neighbours and self.config.neighbours and torch.is_grad_enabled():
            states = self._states_after_detached_neighbours(vectors, labels, neighbour_ids)
        else:
            context, mask = self.causal_context(vectors, neighbour_ids)
            states = teacher_forced_states(self.lm, context, labels, mask)
        logits = self.lm.get_output_embeddings()(states[keep]).float()
        nll = nn.functional.cross_entropy(logits, labels[keep], reduction="none")
        return self._reduce(nll, keep, per_example)

    forward.__doc__ = Inverter.forward.__doc__

    @torch.no_grad()
    def label_logprobs(
        self, vectors: torch.Tensor, labels: torch.Tensor, neighbour_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        context, mask = self.causal_context(vectors, neighbour_ids)
        states = teacher_forced_states(self.lm, context, labels, mask)
        return torch.log_softmax(self.lm.get_output_embeddings()(states).float(), -1)

    # no_grad, not inference_mode: under inference_mode autocast caches no weight cast, and
    # bf16 decoding then re-casts every weight at every step (Inverter._bf16_autocast).
    @torch.no_grad()
    def generate_ids(
        self, vectors: torch.Tensor, neighbour_ids: torch.Tensor | None = None, **generate_kwargs
    ) -> torch.Tensor:
        sampling = generate_kwargs.get("do_sample") and generate_kwargs.get("num_beams", 1) == 1
        if sampling and set(generate_kwargs) <= SAMPLING_ARGS:
            kwargs = dict(generate_kwargs)
            del kwargs["do_sample"]
            kwargs.pop("num_beams", None)
            return self.sample_ids(vectors, neighbour_ids, **kwargs)
        context, mask = self.causal_context(vectors, neighbour_ids)
        kwargs = {"max_new_tokens": self.config.max_length, **generate_kwargs}
        # With only inputs_embeds, generate returns just the new tokens; it derives the
        # positions from the mask, as teacher_forced_states does.
        return self.lm.generate(inputs_embeds=context, attention_mask=mask, **kwargs)

    @torch.no_grad()
    def sample_ids(
        self,
        vectors: torch.Tensor,
        neighbour_ids: torch.Tensor | None = None,
        *,
        num_return_sequences: int = 1,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        max_new_tokens: int | None = None,
    ) -> torch.Tensor:
        """`num_return_sequences` prompts sampled per vector, `[B * n, T]` with each vector's n
        rows together, EOS then padding: what `generate(do_sample=True)` returns, drawn from the
        same distribution, several times faster on a CPU. The context is read once per vector
        (generate reads it once per sample), a finished sample leaves the batch (generate
        decodes every row to the longest), the LoRA adapters are folded into the weights, and
        top-k/top-p need no pass over the whole vocabulary."""
        n, limit = num_return_sequences, max_new_tokens or self.config.max_length
        if temperature <= 0 or not 0 < top_p <= 1 or top_k < 0 or n < 1:
            raise ValueError(
                f"sampling needs temperature > 0, 0 < top_p <= 1, top_k >= 0 and at least one "
                f"sequence; got {temperature}, {top_p}, {top_k}, {n}"
            )
        eos, pad = self.config.eos_token_id, self.config.pad_token_id
        context, mask = self.causal_context(vectors, neighbour_ids)
        with merged_adapters(self.lm):
            cache = DynamicCache(config=self.lm.config)
            first = self.lm(
                inputs_embeds=context,
                attention_mask=mask,
                position_ids=positions(mask),
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1]
            cache.batch_repeat_interleave(n)
            logits, mask = first.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
            position = positions(mask)[:, -1:]
            rows = torch.arange(len(mask), device=mask.device)  # the output row of each
            ids = torch.full((len(mask), limit), pad, dtype=torch.long, device=mask.device)
            t = -1  # no step at all when limit is 0
            for t in range(limit):
                token = draw(logits, temperature, top_k, top_p)
                ids[rows, t] = token
                going = token != eos
                if t + 1 == limit or not going.any():
                    break
                if not going.all():
                    keep = going.nonzero().squeeze(1)
                    rows, token, mask = rows[keep], token[keep], mask[keep]
                    position = position[keep]
                    cache.batch_select_indices(keep)
                mask = torch.cat([mask, mask.new_ones(len(mask), 1)], 1)
                position = position + 1
                logits = self.lm(
                    input_ids=token[:, None],
                    attention_mask=mask,
                    position_ids=position,
                    cache=cache,
                    use_cache=True,
                ).logits[:, -1]
        return ids[:, : t + 1]
