"""The raw bytes of every token id: how an API client and server name tokens unambiguously.

Decoding a single byte-level token often gives "\ufffd" (a partial UTF-8 character), so many
ids share one decoded string. Their raw bytes differ, which is why OpenAI's log-prob entries
carry a `bytes` field; the server and the API recovery target both use this table.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

_SP_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode table (printable stand-ins for raw bytes)."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _decoder_types(tokenizer) -> set[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    spec = json.loads(backend.to_str()).get("decoder") or {}
    found = {spec.get("type", "")}
    for sub in spec.get("decoders", []) or []:
        found.add(sub.get("type", ""))
    return found


def token_bytes(tokenizer, vocab_size: int) -> list[bytes]:
    """Raw bytes of ids 0..vocab_size-1; ids the tokenizer lacks get a unique placeholder."""
    n = min(vocab_size, len(tokenizer))
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    added = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    types = _decoder_types(tokenizer)
    byte_level = "ByteLevel" in types
    table = _byte_decoder()
    out: list[bytes] = []
    for i, piece in enumerate(pieces):
        if i in added:
            out.append(added[i].encode())
        elif piece is None:
            out.append(f"<|unused:{i}|>".encode())
        elif byte_level and all(c in table for c in piece):
            out.append(bytes(table[c] for c in piece))
        elif (m := _SP_BYTE.match(piece)) is not None:
            out.append(bytes([int(m.group(1), 16)]))
        elif "ByteFallback" in types or "Metaspace" in types or piece.startswith("▁"):
            out.append(piece.replace("▁", " ").encode())
        else:
            out.append(tokenizer.decode([i]).encode())
    # Rows of the LM head beyond the tokenizer (padding to a round size) are never text.
    out.extend(f"<|unused:{i}|>".encode() for i in range(n, vocab_size))
    return out


def token_text(raw: bytes) -> str:
    """The display string of a token, as OpenAI's `token` field shows it."""
    return raw.decode("utf-8", errors="replace")
