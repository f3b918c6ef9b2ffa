"""A `Target` on Hugging Face transformers: any causal LM from a directory, the hub, or GGUF."""

from __future__ import annotations

import copy
import hashlib
import inspect
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from ..cache import sha256_file
from ..errors import TargetError
from .base import (
    DEFAULT_USER_TURN,
    Target,
    TargetFingerprint,
    check_prompt_options,
    system_message,
)
from .basis import OutputBasis

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# The fixed user turn of the system threat models ("system", "guarded"): the hidden prompt is
# the system message and the attacker only sees the reply to an innocuous question.
DEFAULT_BATCH_SIZE = 32
# A shared prefix shorter than this is not worth a separate forward pass and cache copy.
MIN_SHARED_PREFIX = 4
# The output layer recomputed in fp32 from the final hidden state must match the model's own
# logits this closely (in nats, after log-softmax) to be used; otherwise (logit soft-capping,
# scaling, a head we do not know) the model's own logits are used and no compact form exists.
HEAD_CHECK_TOL = 1e-3
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


def canonical_dtype(dtype: str) -> str:
    """Map 'fp32'/'bf16'/'fp16' and torch names to 'float32'/'bfloat16'/'float16'."""
    name = DTYPE_ALIASES.get(str(dtype), str(dtype).replace("torch.", ""))
    if name not in DTYPES:
        raise TargetError(f"unknown dtype {dtype!r}; choose one of fp32, bf16, fp16")
    return name


def hash_tokenizer(tokenizer) -> str:
    """Hash of the full tokenizer definition (vocab, merges, normaliser, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(
        tokenizer, "_tokenizer", None
    )
    if backend is not None and hasattr(backend, "to_str"):
        blob = backend.to_str()
    else:
        blob = repr(sorted(tokenizer.get_vocab().items()))
    blob += repr(sorted((tokenizer.special_tokens_map or {}).items()))
    return hashlib.sha256(blob.encode()).hexdigest()


def hash_state_dict(model: torch.nn.Module) -> str:
    """Hash of the weights themselves, for models that have no file on disk."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def hash_weight_files(path: Path) -> str | None:
    """Hash of the weight files of a local model (a file or a directory); None if none found."""
    files = (
        [path]
        if path.is_file()
        else sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    )
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


class HFTarget(Target):
    """Next-token log-probs from a transformers causal LM, batched with left padding."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        name: str,
        weights_sha256: str | None = None,
        mode: str = "user",
        system_prompt: str | None = None,
        user_turn: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        share_prefix: bool = True,
    ):
        check_prompt_options(mode, system_prompt, user_turn)
        user_turn = DEFAULT_USER_TURN if user_turn is None else user_turn
        if mode != "raw" and not getattr(tokenizer, "chat_template", None):
            raise TargetError(
                f"target {name!r} has no chat template, so prompt mode {mode!r} is impossible; "
                "use --mode raw"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.mode = mode
        self.system_prompt = system_prompt
        self.user_turn = user_turn
        self.batch_size = batch_size
        # Rows of a batch that start with the same tokens (a chat template's system turn) share
        # one KV cache of that prefix: ~35% less compute per prompt in user mode.
        self.share_prefix = share_prefix
        self._prefix_memo: tuple | None = None
        self.last_shared_prefix = 0
        self.device = next(model.parameters()).device
        self.dtype = canonical_dtype(str(next(model.parameters()).dtype))
        self.pad_id = (
            tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else (tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)
        )
        params = inspect.signature(model.forward).parameters
        # transformers 5.x renamed `past_key_values` to `cache` in forward(); support both.
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = "logits_to_keep" in params
        vocab = model.get_output_embeddings().weight.shape[0]
        self._basis: OutputBasis | None = None
        self._head_checked = False
        # Low-precision models get their output layer in fp32 (so a step's log-probs are
        # exactly W.h - logsumexp(W.h), storable as h): recorded, as it changes the numbers.
        head = "" if self.dtype == "float32" else "float32"
        self.fingerprint = TargetFingerprint(
            name=name,
            weights_sha256=weights_sha256 or hash_state_dict(model),
            tokenizer_sha256=hash_tokenizer(tokenizer),
            vocab_size=int(vocab),
            mode=mode,
            template=self.render("{prompt}"),
            dtype=self.dtype,
            head=head,
        )

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        gguf_file: str | None = None,
        dtype: str = "float32",
        device: str | None = None,
        name: str | None = None,
        weights_sha256: str | None = None,
        **kwargs,
    ) -> HFTarget:
        """Load a local directory, a GGUF file, or a hub id (never with remote code)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch_dtype = DTYPES[canonical_dtype(dtype)]
        path = Path(name_or_path)
        if path.is_file() and path.suffix == ".gguf":
            path, gguf_file = path.parent, path.name
        load_kw: dict = {"trust_remote_code": False}
        if gguf_file:
            load_kw["gguf_file"] = gguf_file
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), **load_kw)
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype, **load_kw)
        except (OSError, ValueError, KeyError) as exc:
            raise TargetError(
                f"could not load target {name_or_path!r}: it is not a built-in name, and loading "
                f"it as a local path or Hugging Face Hub id failed: {exc}"
            ) from exc
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device)
        if weights_sha256 is None and path.exists():
            local = path / gguf_file if gguf_file else path
            weights_sha256 = hash_weight_files(local)
        if weights_sha256 is None:
            commit = getattr(model.config, "_commit_hash", None)
            weights_sha256 = f"hub:{name_or_path}@{commit}" if commit else None
        return cls(
            model,
            tokenizer,
            name=name or str(name_or_path),
            weights_sha256=weights_sha256,
            **kwargs,
        )

    # ----------------------------------------------------------------- prompts
    def set_user_turn(self, user_turn: str) -> None:
        """Ask another innocuous turn (system modes): a new template, so a new fingerprint."""
        self.user_turn = user_turn
        self.fingerprint = replace(self.fingerprint, template=self.render("{prompt}"))

    def set_system_prompt(self, system_prompt: str) -> None:
        """Another system message (user mode): a new template, so a new fingerprint."""
        self.system_prompt = system_prompt
        self.fingerprint = replace(self.fingerprint, template=self.render("{prompt}"))

    def render(self, prompt: str) -> str:
        """The text the model actually sees for a prompt under this target's mode."""
        if self.mode == "raw":
            return prompt
        if self.mode == "user":
            messages = [{"role": "user", "content": prompt}]
            if self.system_prompt is not None:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
        else:
            messages = [
                {"role": "system", "content": system_message(prompt, self.mode)},
                {"role": "user", "content": self.user_turn},
            ]
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # jinja's TemplateError, or no template at all
            roles = "/".join(m["role"] for m in messages)
            raise TargetError(
                f"this model's chat template cannot render a {roles} chat for {self.mode} mode "
                f"({type(exc).__name__}: {exc}); try another --mode"
            ) from exc

    def render_messages(self, messages: list[dict]) -> str:
        """A chat rendered with this target's template, ready for the assistant's reply."""
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )

    @torch.inference_mode()
    def complete(
        self,
        texts: Sequence[str],
        max_new_tokens: int = 48,
        *,
        sample: bool = False,
        seed: int = 0,
        logits_processor=None,
    ) -> list[str]:
        """Continuations of texts as the model sees them (rendered chats or raw text): greedy,
        or sampled at temperature 1 from a seeded generator (same seed, same draws, so two
        runs that differ only in `logits_processor` are coupled)."""
        from transformers import LogitsProcessorList

        out: list[str] = []
        raw = self.mode == "raw"
        for start in range(0, len(texts), self.batch_size):
            ids = self.tokenizer(
                list(texts[start : start + self.batch_size]), add_special_tokens=raw
            )["input_ids"]
            width = max(len(x) for x in ids)
            input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
            attention = torch.zeros((len(ids), width), dtype=torch.long)
            for i, x in enumerate(ids):  # left padding: every row ends where generation starts
                input_ids[i, width - len(x) :] = torch.tensor(x, dtype=torch.long)
                attention[i, width - len(x) :] = 1
            # Plain temperature-1 sampling: the model's own generation defaults (top-p, ...)
            # would otherwise change the distribution being compared.
            sampling = {"temperature": 1.0, "top_k": 0, "top_p": 1.0} if sample else {}
            if sample:
                torch.manual_seed(seed + start)
            generated = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                max_new_tokens=max_new_tokens,
                do_sample=sample,
                **sampling,
                pad_token_id=self.pad_id,
                logits_processor=LogitsProcessorList(logits_processor or []),
            )
            out.extend(
                self.tokenizer.decode(row[width:], skip_special_tokens=True).strip()
                for row in generated
            )
        return out

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of each rendered prompt (special tokens only where the mode adds them)."""
        texts = [self.render(p) for p in prompts]
        raw = self.mode == "raw"
        return self.tokenizer(list(texts), add_special_tokens=raw)["input_ids"]

    def count_tokens(self, prompts: Sequence[str]) -> list[int]:
        ids = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        return [len(x) for x in ids]

    @property
    def max_context(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    # ----------------------------------------------------------------- forward
    @torch.inference_mode()
    def next_token_logprobs(self, prompts: Sequence[str], steps: int | None = None) -> torch.Tensor:
        if isinstance(prompts, str):
            raise TypeError("next_token_logprobs takes a list of prompts, not a single string")
        k = 1 if steps is None else int(steps)
        if k < 1:
            raise TargetError(f"steps must be >= 1, got {steps}")
        ids = self.encode(prompts)
        out = []
        for start in range(0, len(ids), self.batch_size):
            out.append(self.forward_ids(ids[start : start + self.batch_size], k))
        result = torch.cat(out) if out else torch.empty(0, k, self.vocab_size)
        return result[:, 0] if steps is None else result

    @torch.inference_mode()
    def forward_ids(
        self, batch: list[list[int]], steps: int = 1, *, hidden: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Float32 log-probs `[batch, steps, vocab]` for already-encoded, unpadded inputs;
        with `hidden`, also the final hidden states `[batch, steps, width]` they come from
        (the coordinates of each step in `output_basis()`)."""
        self._check_lengths(batch, steps)
        basis = self.output_basis()
        if hidden and basis is None:
            raise TargetError(
                f"{self.fingerprint.name}: its logits are not W.h of the final hidden state "
                "(see HFTarget.output_basis), so there is no compact form; use --format full"
            )
        n = len(batch)
        shared = self._shared_prefix_len(batch)
        self.last_shared_prefix = shared
        cache = self._prefix_cache(batch[0][:shared], n) if shared else None
        input_ids, attention, positions = self._after_prefix([x[shared:] for x in batch], shared)
        kwargs = {"use_cache": steps > 1 or cache is not None}
        if cache is not None:
            kwargs[self._cache_kw] = cache
        result, states = [], []
        next_token = None
        for step in range(steps):
            if step > 0:
                input_ids = next_token[:, None]
                attention = torch.cat([attention, attention.new_ones((n, 1))], dim=1)
                positions = positions[:, -1:] + 1
                kwargs[self._cache_kw] = cache
            if basis is not None:
                output = self.model.base_model(
                    input_ids=input_ids, attention_mask=attention, position_ids=positions, **kwargs
                )
                state = output.last_hidden_state[:, -1].float()
                logprobs = basis.logprobs(state)
                if hidden:
                    states.append(basis.coordinates(state).cpu())
            else:
                if self._keep_kw:
                    kwargs["logits_to_keep"] = 1  # only the last position's LM head is needed
                output = self.model(
                    input_ids=input_ids, attention_mask=attention, position_ids=positions, **kwargs
                )
                logprobs = torch.log_softmax(output.logits[:, -1].float(), dim=-1)
            result.append(logprobs.cpu())
            if step + 1 < steps:
                cache = getattr(output, self._cache_kw, None)
                if cache is None:
                    cache = getattr(output, "past_key_values", None)
                next_token = logprobs.argmax(dim=-1)
        logprobs = torch.stack(result, dim=1)
        return (logprobs, torch.stack(states, dim=1)) if hidden else logprobs

    @torch.inference_mode()
    def forced_logprobs(
        self, prompts: Sequence[str], replies: Sequence[Sequence[int]]
    ) -> torch.Tensor:
        """Float32 log-probs `[n, steps, vocab]` of each rendered prompt followed by its reply's
        token ids, teacher-forced: step t is the distribution after the reply's first t tokens
        (so a prompt with its own greedy reply gives back `next_token_logprobs`). Every reply
        has the same number of tokens, `steps`; one forward pass per prompt, no generation."""
        if len(prompts) != len(replies):
            raise TargetError(f"{len(prompts)} prompts but {len(replies)} replies")
        steps = {len(r) for r in replies}
        if len(steps) > 1 or 0 in steps:
            raise TargetError(f"every reply needs the same, non-zero length; got {sorted(steps)}")
        k = steps.pop() if steps else 1
        encoded = self.encode(prompts)
        self._check_lengths(encoded, k)
        out = torch.empty(len(encoded), k, self.vocab_size)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # less padding
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            batch = [encoded[i] for i in rows]
            out[rows] = self._forced(batch, [list(replies[i][: k - 1]) for i in rows], k)
        return out

    def _forced(self, batch: list[list[int]], replies: list[list[int]], k: int) -> torch.Tensor:
        """`forced_logprobs` of one batch: one forward pass over each prompt and its reply, the
        tokens every prompt starts with (user mode: the template's system turn) computed once
        and shared from the KV cache, each row left-padded after them so that its last `k`
        positions (the last prompt token, then the reply) line up."""
        n = len(batch)
        # Shared by the prompts alone, so every row keeps its last prompt token of its own.
        shared = self._shared_prefix_len(batch)
        cache = self._prefix_cache(batch[0][:shared], n) if shared else None
        rows = [x[shared:] + r for x, r in zip(batch, replies, strict=True)]
        ids, attention, positions = self._after_prefix(rows, shared)
        kwargs = {"use_cache": cache is not None}
        if cache is not None:
            kwargs[self._cache_kw] = cache
        basis = self.output_basis()
        if basis is not None:
            state = self.model.base_model(
                input_ids=ids, attention_mask=attention, position_ids=positions, **kwargs
            ).last_hidden_state
            return basis.logprobs(state[:, -k:].float()).cpu()
        if self._keep_kw:
            kwargs["logits_to_keep"] = k
        logits = self.model(
            input_ids=ids, attention_mask=attention, position_ids=positions, **kwargs
        ).logits
        return torch.log_softmax(logits[:, -k:].float(), dim=-1).cpu()

    def _after_prefix(
        self, rows: list[list[int]], shared: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input ids `[n, width]` of each row's own tokens, left-padded after `shared` cached
        prefix tokens; the attention mask `[n, shared + width]`; and position ids counting real
        tokens only (the padding sits between the prefix and each row's own tokens)."""
        n, width = len(rows), max(len(x) for x in rows)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((n, shared + width), dtype=torch.long)
        attention[:, :shared] = 1
        for i, x in enumerate(rows):
            ids[i, width - len(x) :] = torch.tensor(x, dtype=torch.long)
            attention[i, shared + width - len(x) :] = 1
        positions = ((attention.cumsum(-1) - 1).clamp(min=0))[:, shared:]
        return ids.to(self.device), attention.to(self.device), positions.to(self.device)

    def _check_lengths(self, encoded: list[list[int]], steps: int) -> None:
        """Refuse an empty encoded prompt, or one whose `steps` positions run past the context."""
        if any(len(x) == 0 for x in encoded):
            raise TargetError("an encoded prompt is empty; the target needs at least one token")
        limit = self.max_context
        if limit is not None and max((len(x) for x in encoded), default=0) + steps - 1 > limit:
            raise TargetError(f"an input is longer than the target's context of {limit} tokens")

    def output_basis(self) -> OutputBasis | None:
        """The output layer as a basis of this target's log-prob vectors (fp32 `W`, bias),
        or None when the model's logits are not `W.h` of its final hidden state.

        Checked once against the model's own forward pass: with the model in fp32 the two
        must agree to HEAD_CHECK_TOL nats. (A bf16 model's own logits are rounded to bf16;
        this target computes them in fp32 instead, see the fingerprint's `head`.)
        """
        if self._head_checked:
            return self._basis
        self._head_checked = True
        head = self.model.get_output_embeddings()
        weight = getattr(head, "weight", None)
        if not isinstance(head, torch.nn.Linear) or weight is None:
            return None
        bias = head.bias.detach().float() if head.bias is not None else None
        basis = OutputBasis(weight.detach().float(), bias)
        probe = self.tokenizer("The quick brown fox", add_special_tokens=True)["input_ids"]
        ids = torch.tensor([probe or [self.pad_id]], device=self.device)
        # Each tensor goes back to its own dtype afterwards: a blanket .to(bf16) would also
        # turn the fp32 buffers a bf16 model keeps (RoPE's inv_freq) into bf16, moving every
        # later vector (positions x inv_freq lose ~0.4%).
        dtypes = {
            name: t.dtype
            for named in (self.model.named_parameters, self.model.named_buffers)
            for name, t in named(remove_duplicate=False)
        }
        with torch.inference_mode():
            model_fp32 = self.model.float() if self.dtype != "float32" else self.model
            try:
                reference = torch.log_softmax(model_fp32(input_ids=ids).logits[:, -1].float(), -1)
                state32 = model_fp32.base_model(input_ids=ids).last_hidden_state[:, -1].float()
            finally:
                if self.dtype != "float32":
                    _restore_dtypes(self.model, dtypes)
        error = float((basis.logprobs(state32) - reference).abs().max())
        if not torch.isfinite(state32).all() or error > HEAD_CHECK_TOL:
            return None
        self._basis = basis
        return basis

    def _shared_prefix_len(self, batch: list[list[int]]) -> int:
        """Tokens every row starts with (the chat template's system turn, say), leaving each
        row at least one token of its own; 0 when too short to be worth a cache."""
        if not self.share_prefix or len(batch) < 2:
            return 0
        first, shortest = batch[0], min(len(x) for x in batch)
        n = 0
        while n < shortest - 1 and all(x[n] == first[n] for x in batch):
            n += 1
        return n if n >= MIN_SHARED_PREFIX else 0

    def _prefix_cache(self, prefix: list[int], batch_size: int):
        """KV cache of `prefix`, computed once per distinct prefix, repeated for the batch."""
        key = tuple(prefix)
        if self._prefix_memo is None or self._prefix_memo[0] != key:
            ids = torch.tensor([prefix], dtype=torch.long, device=self.device)
            output = self.model(
                input_ids=ids, use_cache=True, **({"logits_to_keep": 1} if self._keep_kw else {})
            )
            cache = getattr(output, self._cache_kw, None)
            if cache is None:
                cache = output.past_key_values
            self._prefix_memo = (key, cache)
        cache = copy.deepcopy(self._prefix_memo[1])
        cache.batch_repeat_interleave(batch_size)
        return cache


def _restore_dtypes(model: torch.nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    """Put every parameter and buffer of `model` back to the dtype `dtypes` names for it."""
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        for key, param in module._parameters.items():
            if param is not None:
                param.data = param.data.to(dtypes[prefix + key])
        for key, buf in module._buffers.items():
            if buf is not None:
                module._buffers[key] = buf.to(dtypes[prefix + key])
