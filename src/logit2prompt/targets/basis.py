"""Bases of a target's log-prob vectors, for storing them compactly and losslessly.

A softmax LM's step is `log p = W.h + b - logsumexp(W.h + b)`: the whole vector follows from
the final hidden state h (hidden-size numbers) and the output layer (W, b). `OutputBasis` is
that layer, taken from the weights of a white-box target at load time; a store keeps only h
per step and the basis's hash, never the basis itself.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

OUTPUT_LAYER = "output-layer"
DECODE_ROWS = 1024  # rows reconstructed at a time: 1024 x 49k fp32 is 200 MB


def decode_rows(coords: np.ndarray, width: int, vocab: int, logprobs) -> np.ndarray:
    """`logprobs` (float32 coordinate rows -> log-prob rows) over `[..., width]` coordinates,
    DECODE_ROWS rows at a time; float32 `[..., vocab]`."""
    flat = torch.from_numpy(np.ascontiguousarray(coords, dtype=np.float32)).reshape(-1, width)
    out = np.empty((len(flat), vocab), dtype=np.float32)
    for start in range(0, len(flat), DECODE_ROWS):
        out[start : start + DECODE_ROWS] = logprobs(flat[start : start + DECODE_ROWS]).numpy()
    return out.reshape(*coords.shape[:-1], vocab)


class OutputBasis:
    """A white-box target's output layer in fp32: coordinates h -> log-probs."""

    kind = OUTPUT_LAYER

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight = weight.detach().float().contiguous()  # [vocab, width]
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self._sha256: str | None = None

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    @property
    def width(self) -> int:
        """Numbers stored per step."""
        return self.weight.shape[1]

    @property
    def sha256(self) -> str:
        """Hash of the fp32 weights (and bias): what a compact store checks its reader by."""
        if self._sha256 is None:
            h = hashlib.sha256(np.asarray(self.weight.shape).tobytes())
            h.update(self.weight.cpu().numpy().tobytes())
            if self.bias is not None:
                h.update(self.bias.cpu().numpy().tobytes())
            self._sha256 = h.hexdigest()
        return self._sha256

    def encoding(self) -> dict:
        """The store manifest's description of this basis."""
        return {
            "kind": self.kind,
            "width": self.width,
            "bias": self.bias is not None,
            "basis_sha256": self.sha256,
        }

    def linear(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(L [vocab, width], b [vocab] or None) with log-probs = log_softmax(L.h + b)."""
        return self.weight, self.bias

    def logprobs(self, state: torch.Tensor) -> torch.Tensor:
        """Float32 log-probs `[..., vocab]` of final hidden states `[..., width]`."""
        w = self.weight.to(state.device)
        logits = state.float() @ w.T
        if self.bias is not None:
            logits = logits + self.bias.to(state.device)
        return torch.log_softmax(logits, dim=-1)

    def coordinates(self, state: torch.Tensor) -> torch.Tensor:
        """What a compact store keeps per step: the fp32 hidden state itself."""
        return state.float()

    def decode(self, coords: np.ndarray) -> np.ndarray:
        """Float32 log-probs `[..., vocab]` from stored coordinates `[..., width]`."""
        with torch.inference_mode():
            return decode_rows(coords, self.width, self.vocab_size, self.logprobs)


FITTED = "fitted"
FITTED_FILE = "basis.npy"
FIT_TOLERANCE = 1e-3  # nats: the held-out reconstruction error a fitted basis must meet


class FittedBasis:
    """An orthonormal basis `[vocab, width]` of centred log-prob vectors, fitted from full
    vectors of a target without weights (an API). Coordinates are the centred vector's
    projections; a vector is rebuilt as z - logsumexp(z) with z = basis @ coords, exact when
    the vector lies in the span (every softmax LM's do, with width = hidden size + at most 1).
    """

    kind = FITTED

    def __init__(self, basis: np.ndarray):
        self.basis = np.ascontiguousarray(basis, dtype=np.float32)
        self._torch = torch.from_numpy(self.basis)
        self.sha256 = hashlib.sha256(
            np.asarray(self.basis.shape).tobytes() + self.basis.tobytes()
        ).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self.basis.shape[0]

    @property
    def width(self) -> int:
        return self.basis.shape[1]

    def encoding(self) -> dict:
        return {
            "kind": self.kind,
            "width": self.width,
            "bias": False,
            "basis_sha256": self.sha256,
            "file": FITTED_FILE,
        }

    def linear(self) -> tuple[torch.Tensor, None]:
        """(L [vocab, width], None) with log-probs = log_softmax(L.a)."""
        return self._torch, None

    def coordinates_of(self, logprobs: np.ndarray) -> np.ndarray:
        """Float32 coordinates `[..., width]` of full log-prob vectors `[..., vocab]`."""
        x = torch.from_numpy(np.ascontiguousarray(logprobs, dtype=np.float32))
        x = x - x.mean(-1, keepdim=True)
        return (x @ self._torch).numpy()

    def decode(self, coords: np.ndarray) -> np.ndarray:
        """Float32 log-probs `[..., vocab]` from coordinates `[..., width]`."""
        return decode_rows(
            coords,
            self.width,
            self.vocab_size,
            lambda rows: torch.log_softmax(rows @ self._torch.T, -1),
        )

    @classmethod
    def fit(
        cls, vectors: np.ndarray, tolerance: float = FIT_TOLERANCE, seed: int = 0
    ) -> tuple[FittedBasis | None, dict]:
        """Fit on 3/4 of `vectors` `[n, vocab]` (rank read from the spectrum) and check the
        other 1/4 rebuilds to `tolerance` nats. Returns (basis or None, a report): None when
        the vectors do not lie in a low-rank subspace (a defense, a quantised server) or are
        too few to tell (fewer than about twice the rank)."""
        from ..models.prefix_lm import fit_subspace

        x = np.asarray(vectors, dtype=np.float32).reshape(-1, np.shape(vectors)[-1])
        order = np.random.default_rng(seed).permutation(len(x))
        held = max(len(x) // 4, 1)
        report: dict = {"calibration_vectors": len(x)}
        if len(x) < 8:
            return None, {**report, "reason": "too few calibration vectors"}
        basis, _, _, sing = fit_subspace(x[order[held:]], 1)
        fitted = cls(basis)
        test = x[order[:held]]
        error = float(np.abs(fitted.decode(fitted.coordinates_of(test)) - test).max())
        report.update(rank=fitted.width, heldout_max_abs_error=error)
        if not np.isfinite(error) or error > tolerance:
            return None, {**report, "reason": f"held-out error {error:.2e} > {tolerance:g}"}
        return fitted, report

    def save(self, directory) -> None:
        from pathlib import Path

        np.save(Path(directory) / FITTED_FILE, self.basis)

    @classmethod
    def load(cls, directory) -> FittedBasis:
        from pathlib import Path

        return cls(np.load(Path(directory) / FITTED_FILE, allow_pickle=False))
