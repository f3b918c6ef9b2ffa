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
        flat = torch.from_numpy(np.ascontiguousarray(coords, dtype=np.float32)).reshape(
            -1, self.width
        )
        out = np.empty((len(flat), self.vocab_size), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(flat), DECODE_ROWS):
                out[start : start + DECODE_ROWS] = self.logprobs(
                    flat[start : start + DECODE_ROWS]
                ).numpy()
        return out.reshape(*coords.shape[:-1], self.vocab_size)
