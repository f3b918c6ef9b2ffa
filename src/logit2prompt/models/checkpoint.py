"""Inverter checkpoints: one directory, HF style, for either architecture.

    inverter_config.json   the architecture's config (`format`, `version` and its fields)
    model.safetensors      weights, feature statistics included
    fingerprint.json       the target the vectors came from
    training_args.json     how it was trained (written by the trainer)
    tokenizer files        the output tokenizer
    decoder_config.json    prefix-lm only: the decoder LM's architecture (no download)
    neighbours.*           retrieval-augmented only: the neighbour memory (retrieval.py)

The config is not named `config.json` so that `AutoTokenizer.from_pretrained(dir)` never takes
it for a transformers model config. Version 1 (logit2prompt 0.1) stored the fields of both
architectures in one config; it loads unchanged (the unused fields are dropped).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError
from ..targets.base import TargetFingerprint
from .config import CAUSAL, InverterConfig
from .retrieval import NeighbourMemory

CONFIG_NAME = "inverter_config.json"
WEIGHTS_NAME = "model.safetensors"
FINGERPRINT_NAME = "fingerprint.json"
TRAINING_ARGS_NAME = "training_args.json"
CHECKPOINT_FORMAT = "logit2prompt-inverter"
CHECKPOINT_VERSION = 2
READABLE_VERSIONS = (1, 2)


def is_checkpoint(directory: str | Path) -> bool:
    """Whether `directory` looks like an inverter checkpoint (without loading it)."""
    return (Path(directory) / CONFIG_NAME).is_file()


def save_inverter(model, directory: str | Path, training_args: dict | None = None) -> None:
    """Write weights (safetensors), config, tokenizer, fingerprint and training args."""
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_model(
        model,
        str(directory / WEIGHTS_NAME),
        metadata={"format": CHECKPOINT_FORMAT, "version": str(CHECKPOINT_VERSION)},
    )
    header = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION}
    (directory / CONFIG_NAME).write_text(json.dumps({**header, **model.config.to_dict()}, indent=1))
    if model.fingerprint is not None:
        (directory / FINGERPRINT_NAME).write_text(json.dumps(model.fingerprint.to_dict(), indent=1))
    if training_args is not None:
        (directory / TRAINING_ARGS_NAME).write_text(json.dumps(training_args, indent=1))
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(directory)
    model.save_extra(directory)
    if model.memory is not None:
        model.memory.save(directory)


def read_config(directory: str | Path) -> InverterConfig:
    """The checkpoint's config; CheckpointError if the directory is not a checkpoint."""
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
    if version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{directory} has checkpoint version {version}; this logit2prompt reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    return InverterConfig.from_dict(raw)


def load_inverter(directory: str | Path, device: str | None = None):
    """Load a checkpoint written by `save_inverter`; CheckpointError if foreign or corrupted."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model
    from transformers import AutoTokenizer

    from .inverter import Inverter

    directory = Path(directory)
    config = read_config(directory)
    if hasattr(config, "t5_init"):
        config.t5_init = None  # the weights below replace any pretrained init
    decoder_config = None
    if config.decoder == CAUSAL:
        from .prefix_lm import DECODER_CONFIG_NAME

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
    model = Inverter.from_config(config, tokenizer, fingerprint, decoder_config)
    try:
        missing, unexpected = load_model(model, str(directory / WEIGHTS_NAME), strict=False)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"{directory / WEIGHTS_NAME} is missing or corrupted: {exc}") from exc
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
