"""Inverters shipped inside the package, loaded by name (`Inverter.from_pretrained(NAME)`,
`--checkpoint NAME`): `default` is the one for the embedded default target."""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError
from .checkpoint import is_checkpoint

PRETRAINED_DIR = Path(__file__).resolve().parent.parent / "pretrained"
DEFAULT_NAME = "default"


def shipped() -> list[str]:
    """Names of the shipped inverters (each a slim checkpoint directory)."""
    if not PRETRAINED_DIR.is_dir():
        return []
    return sorted(p.name for p in PRETRAINED_DIR.iterdir() if is_checkpoint(p))


def resolve_checkpoint(name_or_dir: str | Path) -> Path:
    """A checkpoint directory as given, or the shipped inverter of that name ('default': the
    one for the embedded default target); CheckpointError naming what exists otherwise."""
    path = Path(name_or_dir)
    if path.exists():
        return path
    name = str(name_or_dir)
    if name == DEFAULT_NAME:
        from ..targets.embedded import DEFAULT_TARGET

        name = DEFAULT_TARGET
    candidate = PRETRAINED_DIR / name
    if is_checkpoint(candidate):
        return candidate
    names = shipped()
    names = ", ".join([DEFAULT_NAME, *names]) if names else "none"
    raise CheckpointError(
        f"{name_or_dir} is neither a checkpoint directory nor a shipped inverter (shipped: {names})"
    )
