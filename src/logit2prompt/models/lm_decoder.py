"""A pretrained causal LM as the inverter's decoder (not in the paper; `decoder="causal"`).

The paper starts from a pretrained T5; none is available offline, and a T5 trained from scratch
on a CPU budget never learns enough English to beat retrieval. The target itself is a pretrained
LM that is always at hand, so the inverter can read the vector as a *prefix* of pseudo-token
embeddings in front of the prompt and let that LM write the prompt (as ClipCap does for images):

    log-probs -> centre over the vocabulary -> project on the training vectors' principal
    directions (PILS: they span only hidden-size dimensions) -> standardise -> MLP ->
    `prefix_length` embeddings -> causal LM -> prompt tokens

The projection is lossless for the full vectors of a softmax LM (Nazir et al. 2025) and turns a
49k-entry vector into a few hundred coordinates.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import CheckpointError, VectorError

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


def fit_subspace(
    vectors: np.ndarray, steps: int, dims: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Principal directions of centred training vectors `[n, dim]` (float32).

    Returns (basis `[dim, r]`, coordinate mean `[r]`, coordinate std `[r]`, singular values).
    `dims` = 0 keeps the directions above the noise floor (see `FLOOR_FACTOR`).
    """
    x = centre(torch.as_tensor(np.asarray(vectors, dtype=np.float32)), steps).double()
    if len(x) < 2:
        raise VectorError("need at least 2 training vectors to fit the subspace")
    # Eigen-decomposition of the n x n Gram matrix: n (thousands) << dim (the vocabulary).
    gram = x @ x.T
    evals, evecs = torch.linalg.eigh(gram)
    evals, evecs = evals.flip(0).clamp(min=0), evecs.flip(1)
    sing = evals.sqrt()
    floor = max(FLOOR_FACTOR * float(sing.median()), REL_TOL * float(sing[0]))
    rank = int((sing > floor).sum())
    r = min(dims, len(x)) if dims else rank
    if r < 1:
        raise VectorError("the training vectors are all constant; no subspace to project on")
    basis = (x.T @ evecs[:, :r]) / sing[:r].clamp(min=1e-12)
    coords = x @ basis
    mean, std = coords.mean(0), coords.std(0).clamp(min=1e-6)
    as_np = lambda t: t.float().numpy()  # noqa: E731
    return as_np(basis), as_np(mean), as_np(std), as_np(sing)


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
    try:
        return AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load the decoder LM {init!r}: {exc}") from exc


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding, as `generate` derives them from the attention mask:
    a left-padded context then reads the same positions in training and in generation."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def teacher_forced_states(
    lm, context: torch.Tensor, labels: torch.Tensor, context_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Hidden states `[B, T, H]` that predict `labels` `[B, T]` (-100 padded): the context's
    last position predicts the first label, each label position the next. `context_mask`
    marks the real positions of a left-padded context (default: all real)."""
    ids = labels.clamp(min=0)
    tokens = lm.get_input_embeddings()(ids).to(context.dtype)
    embeds = torch.cat([context, tokens], 1)
    k = context.shape[1]
    if context_mask is None:
        context_mask = torch.ones(context.shape[:2], dtype=torch.long, device=context.device)
    mask = torch.cat([context_mask.long(), (labels != -100).long()], 1)
    # Right padding of the labels with an explicit mask: padded positions are never read by
    # real ones.
    hidden = lm.base_model(
        inputs_embeds=embeds, attention_mask=mask, position_ids=positions(mask)
    ).last_hidden_state
    return hidden[:, k - 1 : k - 1 + labels.shape[1]]
