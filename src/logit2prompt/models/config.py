"""Inverter configurations: the fields every inverter shares, and one subclass per architecture.

`InverterConfig.preset(name, ...)` returns the architecture's config; `InverterConfig.from_dict`
reads a checkpoint's, including those of checkpoint version 1, which stored the fields of both
architectures in one class (the other architecture's fields are dropped).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..errors import CheckpointError
from .features import num_chunks

T5 = "t5"
CAUSAL = "causal"
DECODERS = (T5, CAUSAL)


@dataclass
class InverterConfig:
    """What every inverter has: the observation's shape, the output side and the neighbours."""

    vocab_size: int  # of the target: entries per distribution
    # Distributions per prompt it was trained on (PILS-style multi-step uses > 1): the first
    # `steps` of the target's greedy continuation. Inversion may give it any number up to
    # `step_positions` (test-time extension).
    steps: int = 1
    # Learned embeddings marking which step an encoder position / prefix token comes from
    # (0: none, as in checkpoints from before multi-step). The trainer sets 64 when steps > 1.
    step_positions: int = 0
    embed_hidden: int = 1024  # hidden width of the observation -> embedding MLP
    dropout: float = 0.0
    normalization: str = "standardize"
    max_length: int = 64  # output tokens (the paper's prompts have at most 64 tokens)
    output_vocab_size: int = 0  # of the output tokenizer; filled from it
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    # Retrieval augmentation (not in the paper): the inverter also reads the token ids of the
    # `neighbours` training prompts whose vectors are nearest (see retrieval.py).
    neighbours: int = 0
    neighbour_dims: int = 1024  # count-sketch width of the neighbour memory's keys
    # Tokens read of each neighbour (0: max_length, all of it). Neighbours are most of the
    # decoder's input tokens, so a shorter cut makes every step cheaper.
    neighbour_length: int = 0
    decoder: str = T5  # which architecture: set by the subclass, recorded in checkpoints
    # Token-subset observations (targets/subset.py): the recorded subset (ids included) whose
    # centred log-probs it reads instead of whole vectors, so that it can be applied to what
    # an API gives in ~|S|/(k-1) queries per step. None: whole vectors.
    subset: dict | None = None

    @property
    def input_width(self) -> int:
        """Entries it reads per step: the subset's size, or the vocabulary."""
        return int(self.subset["width"]) if self.subset else self.vocab_size

    @property
    def dim(self) -> int:
        return self.steps * self.input_width

    @property
    def max_steps(self) -> int:
        """The most steps it can read at inversion."""
        return max(self.step_positions, self.steps)

    @classmethod
    def preset(cls, name: str, **overrides) -> InverterConfig:
        """'tiny' (tests), 'small' (CPU, T5), 'base' (T5-base sizes, for GPUs), 'prefix-lm'
        (the target's own LM as decoder). Overrides that belong to the other architecture are
        refused unless they are unset (None/False), so one call site can serve both."""
        sizes = PRESETS.get(name)
        if sizes is None:
            raise ValueError(
                f"unknown inverter preset {name!r}; choose one of {', '.join(PRESETS)}"
            )
        config_cls = config_class(sizes.get("decoder", T5))
        known = {f.name for f in fields(config_cls)}
        foreign = {k: v for k, v in overrides.items() if k not in known}
        bad = {k: v for k, v in foreign.items() if v not in (None, False)}
        if bad:
            raise ValueError(
                f"preset {name!r} ({config_cls.__name__}) has no setting "
                f"{', '.join(sorted(bad))}; it belongs to another architecture"
            )
        kept = {k: v for k, v in overrides.items() if k in known}
        return config_cls(**{**sizes, **kept})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> InverterConfig:
        """The right subclass for a saved config; CheckpointError on unknown fields."""
        decoder = d.get("decoder", T5)
        if decoder not in DECODERS:
            raise CheckpointError(f"inverter config names an unknown decoder {decoder!r}")
        config_cls = config_class(decoder)
        known = {f.name for f in fields(config_cls)}
        # Version-1 checkpoints stored every architecture's fields; the others are dropped.
        every = known | {f.name for c in (T5InverterConfig, PrefixLMConfig) for f in fields(c)}
        unknown = set(d) - every
        if unknown:
            raise CheckpointError(f"inverter config has unknown fields {sorted(unknown)}")
        return config_cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class T5InverterConfig(InverterConfig):
    """The paper's architecture: the vector unrolled into chunks, an MLP to pseudo-embeddings,
    a T5 encoder-decoder."""

    chunk_width: int = 1024  # d: entries of the vector per encoder position
    d_model: int = 256
    d_ff: int = 1024
    d_kv: int = 64
    num_heads: int = 4
    num_layers: int = 4
    num_decoder_layers: int = 4
    feed_forward_proj: str = "gated-gelu"
    # T5's name for "scale decoder outputs by d_model**-0.5" (t5 yes, t5-v1.1/flan no);
    # transformers 5 ties the output layer to the embeddings either way.
    tie_word_embeddings: bool = False
    t5_init: str | None = None  # hub id or directory of a pretrained T5 to start from
    # Pointer-generator output: each token is either generated or copied from a neighbour.
    neighbour_copy: bool = False

    def __post_init__(self) -> None:
        if self.decoder != T5:
            raise ValueError(f"T5InverterConfig has decoder {T5!r}, not {self.decoder!r}")

    @property
    def chunks_per_step(self) -> int:
        return num_chunks(self.input_width, self.chunk_width)

    @property
    def seq_len(self) -> int:
        """Encoder positions of the vector at `steps` steps (each step unrolled alone)."""
        return self.chunks_per_step * self.steps


@dataclass
class PrefixLMConfig(InverterConfig):
    """A pretrained causal LM (`decoder_init`, by default the target's own weights) reads
    `prefix_length` pseudo-embeddings made from the vector's coordinates in its `subspace_dim`
    principal directions (see prefix_lm.py)."""

    decoder: str = CAUSAL
    embed_hidden: int = 2048
    decoder_init: str | None = None
    prefix_length: int = 16  # pseudo-tokens in all, at the trained number of steps
    subspace_dim: int = 0  # filled by the trainer from the training vectors' rank
    step_tokens: int = 0  # pseudo-tokens per step (0: prefix_length // steps, at least 1)
    # LoRA adapters (peft) on every projection of the decoder, whose own weights then stay
    # frozen: no weight gradients or optimizer state for them (0: train every weight).
    lora_rank: int = 0
    lora_alpha: float = 0.0  # adapter scale alpha / rank (0: 2 x rank)
    # Training only (outputs are unchanged): the neighbours come first in the decoder's
    # context, so their keys and values do not depend on the vector; computed without
    # gradients, each neighbour token costs a forward pass instead of forward + backward.
    # Nothing learns from the neighbours' own positions then (the rank embeddings stay zero).
    detach_neighbours: bool = False
    # Each step's most likely token (the greedy reply the log-probs come from) as one more
    # prefix position, embedded by the decoder itself: the reply reads as text, and the LM
    # copies from text by attention. Needs whole vectors and the target's own vocabulary; no
    # weight depends on it, so a trained inverter may switch it on (`--init-from`).
    reply_tokens: bool = False
    # False: no pseudo-tokens at all, the prefix is the greedy reply alone (text-only
    # inversion of the same observation, output2prompt's input with this decoder; needs
    # reply_tokens). The log-probs then serve only to find the reply and the neighbours.
    pseudo_tokens: bool = True

    @property
    def tokens_per_step(self) -> int:
        """Pseudo-tokens per step (the reply token, if any, not counted)."""
        if not self.pseudo_tokens:
            return 0
        return self.step_tokens or max(1, self.prefix_length // self.steps)

    def __post_init__(self) -> None:
        if self.decoder != CAUSAL:
            raise ValueError(f"PrefixLMConfig has decoder {CAUSAL!r}, not {self.decoder!r}")
        # The output vocabulary is known once the tokenizer is (fill_token_ids checks again).
        other_vocab = self.output_vocab_size not in (0, self.vocab_size)
        if self.reply_tokens and (self.subset or other_vocab):
            raise ValueError(
                "reply_tokens reads each step's most likely token with the decoder's own "
                "embeddings: it needs whole vectors (no token subset) over the decoder's vocabulary"
            )
        if not (self.pseudo_tokens or self.reply_tokens):
            raise ValueError(
                "pseudo_tokens=false leaves the prefix-lm nothing to read: set reply_tokens=true "
                "too (a text-only inverter of the greedy reply)"
            )


def config_class(decoder: str) -> type[InverterConfig]:
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, not {decoder!r}")
    return PrefixLMConfig if decoder == CAUSAL else T5InverterConfig


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
    "prefix-lm": dict(decoder=CAUSAL, embed_hidden=2048, prefix_length=16),
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
