"""Inverter checkpoints: one directory, HF style, for either architecture.

    inverter_config.json   the architecture's config (`format`, `version` and its fields)
    model.safetensors      weights, feature statistics included
    fingerprint.json       the target the vectors came from
    training_args.json     how it was trained (written by the trainer)
    tokenizer files        the output tokenizer
    decoder_config.json    prefix-lm only: the decoder LM's architecture (no download)
    neighbours.*           retrieval-augmented only: the neighbour memory (retrieval.py)
    derived.json           slim checkpoints only: what was left out and how it is rebuilt

A slim checkpoint (`save_pretrained(..., slim=True)`, `logit2prompt export`) of a LoRA prefix-lm
leaves out what the decoder's own pretrained weights give back: every frozen decoder weight
(reloaded from `decoder_init`, checked by hash) and the subspace basis (stored as its
coefficients over the decoder's output layer and a constant, ~1 MB instead of ~113 MB). That is
what makes an inverter small enough to ship in the repository.

The config is not named `config.json` so that `AutoTokenizer.from_pretrained(dir)` never takes
it for a transformers model config. Version 1 (logit2prompt 0.1) stored the fields of both
architectures in one config; it loads unchanged (the unused fields are dropped).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import CheckpointError, TargetError
from ..targets.base import TargetFingerprint
from .config import CAUSAL, InverterConfig
from .retrieval import MEMORY_PROMPTS, MEMORY_WEIGHTS, NeighbourMemory

CONFIG_NAME = "inverter_config.json"
WEIGHTS_NAME = "model.safetensors"
FINGERPRINT_NAME = "fingerprint.json"
TRAINING_ARGS_NAME = "training_args.json"
DERIVED_NAME = "derived.json"
BASIS_COEFFICIENTS = "basis_coefficients"
# Largest error of a rebuilt basis entry relative to the largest entry, or the basis is stored.
BASIS_TOLERANCE = 1e-4
SLIM_DTYPES = ("float32", "float16", "bfloat16")
CHECKPOINT_FORMAT = "logit2prompt-inverter"
CHECKPOINT_VERSION = 2
READABLE_VERSIONS = (1, 2)


def is_checkpoint(directory: str | Path) -> bool:
    """Whether `directory` looks like an inverter checkpoint (without loading it)."""
    return (Path(directory) / CONFIG_NAME).is_file()


def save_inverter(
    model,
    directory: str | Path,
    training_args: dict | None = None,
    *,
    slim: bool = False,
    dtype: str = "float32",
) -> None:
    """Write weights (safetensors), config, tokenizer, fingerprint and training args; `slim`
    leaves out what the decoder's pretrained weights give back, storing the rest in `dtype`."""
    from safetensors.torch import save_file, save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {"format": CHECKPOINT_FORMAT, "version": str(CHECKPOINT_VERSION)}
    config = model.config.to_dict()
    if slim:
        tensors, derived = slim_state(model, dtype)
        config["decoder_init"] = derived["decoder_init"]
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata={**metadata, "slim": "1"})
        (directory / DERIVED_NAME).write_text(json.dumps(derived, indent=1))
    else:
        save_model(model, str(directory / WEIGHTS_NAME), metadata=metadata)
        (directory / DERIVED_NAME).unlink(missing_ok=True)
    header = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION}
    (directory / CONFIG_NAME).write_text(json.dumps({**header, **config}, indent=1))
    # A folder reused for another model keeps none of the old one's optional files: loading
    # would attach an old neighbour memory or target to this model.
    if model.fingerprint is not None:
        (directory / FINGERPRINT_NAME).write_text(json.dumps(model.fingerprint.to_dict(), indent=1))
    else:
        (directory / FINGERPRINT_NAME).unlink(missing_ok=True)
    if training_args is not None:
        (directory / TRAINING_ARGS_NAME).write_text(json.dumps(training_args, indent=1))
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(directory)
    model.save_extra(directory)
    if model.memory is not None:
        model.memory.save(directory)
    else:
        for name in (MEMORY_WEIGHTS, MEMORY_PROMPTS):
            (directory / name).unlink(missing_ok=True)


def _base_key(key: str) -> str | None:
    """The pretrained decoder's name of one of our decoder weights (None: not a decoder
    weight, or a LoRA adapter)."""
    if not key.startswith("lm.") or ".lora_" in key:
        return None
    return key[len("lm.") :].replace(".base_layer.", ".")


def _hash_tensors(tensors: dict) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _portable_init(init: str | None) -> str | None:
    """`decoder_init` as a name that resolves on any machine: the embedded target's name for
    its cached conversion, which is a path of this machine."""
    from ..targets.embedded import DEFAULT_TARGET, target_weights

    if init and Path(init).exists():
        try:
            if Path(init).resolve() == Path(target_weights(DEFAULT_TARGET)).resolve():
                return DEFAULT_TARGET
        except (TargetError, OSError):  # the embedded target is not installed: keep the path
            return init
    return init


def slim_state(model, dtype: str = "float32") -> tuple[dict, dict]:
    """The tensors a slim checkpoint stores and the record of what it leaves out."""
    import torch

    from .prefix_lm import load_causal_lm

    if dtype not in SLIM_DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose one of {', '.join(SLIM_DTYPES)}")
    if not model.causal or not model.config.lora_rank:
        raise CheckpointError(
            "only a prefix-lm with LoRA adapters (lora_rank > 0) has a slim form: the other "
            "recipes train every decoder weight, so there is nothing to rebuild them from"
        )
    base = load_causal_lm(model.config.decoder_init).state_dict()  # on the CPU
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    dropped = {}
    for key, tensor in state.items():
        name = _base_key(key)
        if name is not None and name in base and torch.equal(tensor, base[name]):
            dropped[key] = tensor
    kept = {k: v for k, v in state.items() if k not in dropped}
    derived = {
        "decoder_init": _portable_init(model.config.decoder_init),
        "decoder_weights_sha256": _hash_tensors(dropped),
        "dropped": sorted(dropped),
        "dtype": dtype,
    }
    head = model.lm.get_output_embeddings().weight.detach().cpu()
    # The basis is rebuilt from the output layer only where it spans the same tokens (not
    # for a token subset, nor a decoder of another vocabulary than the target's).
    same_rows = head.shape[0] == model.basis.shape[0]
    basis = model.basis.detach().cpu()
    coefficients, error = _basis_coefficients(head, basis) if same_rows else (None, 1.0)
    if error <= BASIS_TOLERANCE:
        del kept["basis"]
        kept[BASIS_COEFFICIENTS] = coefficients.float()
        derived["basis"] = {"from": "decoder output layer and a constant", "error": error}
    target = getattr(torch, dtype)
    # Only weights take the smaller dtype: the buffers (feature mean/std, prefix norm, basis)
    # standardise every input, and bf16's 3 digits would shift them all.
    buffers = {name for name, _ in model.named_buffers()} | {BASIS_COEFFICIENTS}
    tensors = {
        k: (v.to(target) if v.is_floating_point() and k not in buffers else v).contiguous()
        for k, v in kept.items()
    }
    return tensors, derived


def _basis_design(head):
    """`[head, 1]` in float64: the decoder's output layer and a constant column, the span a
    slim checkpoint's basis is rebuilt from."""
    import torch

    head = head.detach().double()
    return torch.cat([head, torch.ones(len(head), 1, dtype=torch.float64)], 1)


def _basis_coefficients(head, basis):
    """Least-squares coefficients C with [head, 1] @ C = basis, and the largest error of the
    basis rebuilt from float32 C (as loading rebuilds it), relative to the largest entry."""
    import torch

    design = _basis_design(head)
    coefficients = torch.linalg.lstsq(design, basis.double()).solution
    rebuilt = design @ coefficients.float().double()
    error = float(
        (rebuilt - basis.double()).abs().max() / basis.double().abs().max().clamp(min=1e-30)
    )
    return coefficients, error


def _rebuild_basis(model, coefficients) -> None:
    design = _basis_design(model.lm.get_output_embeddings().weight)
    model.basis.copy_((design @ coefficients.double()).float())


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


def _read_derived(directory: Path) -> dict | None:
    path = directory / DERIVED_NAME
    if not path.is_file():
        return None
    try:
        derived = json.loads(path.read_text())
        derived["dropped"], derived["decoder_weights_sha256"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is corrupted: {exc}") from exc
    return derived


def _load_slim(model, directory: Path, derived: dict) -> None:
    """Fill a freshly built inverter (decoder from `decoder_init`) from a slim checkpoint."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(directory / WEIGHTS_NAME))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{directory / WEIGHTS_NAME} is missing or corrupted: {exc}") from exc
    coefficients = tensors.pop(BASIS_COEFFICIENTS, None)
    state = model.state_dict()
    expected = (
        set(state) - set(derived["dropped"]) - ({"basis"} if coefficients is not None else set())
    )
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise CheckpointError(
            f"{directory / WEIGHTS_NAME} does not match its config: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    dropped = {k: state[k] for k in derived["dropped"]}
    if _hash_tensors(dropped) != derived["decoder_weights_sha256"]:
        raise CheckpointError(
            f"{directory}: the decoder weights of {derived['decoder_init']!r} differ from those "
            "this slim checkpoint was trained on (another version of the model?)"
        )
    try:
        model.load_state_dict({k: v.to(state[k].dtype) for k, v in tensors.items()}, strict=False)
        if coefficients is not None:
            _rebuild_basis(model, coefficients)
    except RuntimeError as exc:  # a tensor of another shape than the config builds
        raise CheckpointError(
            f"{directory / WEIGHTS_NAME} does not match its config: {exc}"
        ) from exc


def load_inverter(directory: str | Path, device: str | None = None):
    """Load a checkpoint written by `save_inverter`; CheckpointError if foreign or corrupted."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model
    from transformers import AutoTokenizer

    from .inverter import Inverter
    from .pretrained import resolve_checkpoint

    directory = resolve_checkpoint(directory)
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
        try:
            fingerprint = TargetFingerprint.from_dict(
                json.loads((directory / FINGERPRINT_NAME).read_text())
            )
        except (ValueError, TypeError, KeyError) as exc:
            raise CheckpointError(
                f"{directory / FINGERPRINT_NAME} is corrupted or foreign: {exc!r}"
            ) from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{directory}: output tokenizer unreadable: {exc}") from exc
    derived = _read_derived(directory)
    if derived is not None:
        # Slim: the decoder comes from its pretrained weights, the rest from the file.
        decoder_config = None
    model = Inverter.from_config(config, tokenizer, fingerprint, decoder_config)
    if derived is None:
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
    else:
        _load_slim(model, directory, derived)
    # A plain inverter may carry a memory too (`export --memory-data`): for the
    # nearest-neighbour baseline and the re-ranker, not read by the inverter itself.
    if config.neighbours or (directory / MEMORY_WEIGHTS).is_file():
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
