"""Every way to answer "which prompt produced these log-probs?", defined once.

A `Method` names its key (the short name callers select it by), the rows reports show, what
it needs and a predict function over a shared `MethodContext`. `evaluate`, the quickstart,
`invert --rerank-with/--fallback-to` and benchmarks/quality.py all run methods through
`run_methods`, so a new method (say, another re-ranker) is written once and `register`ed.

The context memoises the work methods share: one beam search serves the inverter's row and
the re-ranker when they decode the same beams, and one nearest-neighbour search (at the
largest count any selected method reads) serves the nearest neighbour, the re-ranker, the
fallback and refinement.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..attacks.invert import SAMPLING, sample_rows, seeded
from ..attacks.mbr import DEFAULT_UTILITY
from ..attacks.rerank import DEFAULT_BEAMS, DEFAULT_CONFIDENCE_NATS, DEFAULT_NEIGHBOURS
from ..errors import Logit2PromptError

logger = logging.getLogger(__name__)

# What a method may need, as error messages name it (in the order they are reported).
NEEDS = {
    "inverter": "the trained inverter",
    "target": "the target (it sends it queries)",
    "references": "the hidden prompts themselves",
    "text_checkpoint": "a text-only inverter",
    "train": "the training prompts (a store, or the inverter's neighbour memory)",
    "store": "the training store's vectors",
}


@dataclass
class MethodContext:
    """The inputs every method reads, its decoding settings, and the work methods share.

    `vectors` are the observed log-probs `[n, steps, vocab]`; `references` the hidden prompts
    (only methods that hand them to the target need them). `batch_size` batches the target's
    queries and, unless `decode_batch_size` is set, the inverter's decoding. `rerank_beams`:
    the beams the re-ranker decodes (the inverter's own decode when it equals `num_beams`).
    `near`: each row's nearest training indices, closest first, if searched already.
    """

    inverter: object | None
    vectors: np.ndarray
    target: object | None = None
    train: object | None = None  # the training DistributionStore (or MemoryNeighbours)
    references: Sequence[str] | None = None
    num_beams: int = 1
    no_repeat_ngram_size: int = 0
    batch_size: int = 32
    decode_batch_size: int | None = None
    bf16: bool = False
    rerank_beams: int = DEFAULT_BEAMS
    confidence_nats: float = DEFAULT_CONFIDENCE_NATS
    refine_rounds: int = 0
    # Extraction strings: a JSON file, the strings themselves, or None (the built-in list).
    attacks: str | Sequence[str] | None = None
    leak_filter: object | None = None  # a LeakFilter on the extraction replies (guarded)
    text_checkpoint: str | None = None
    progress: bool = True
    keep_beams: bool = False  # the inverter's row decodes all `num_beams` beams (see `beams`)
    mbr_samples: int = 16  # the MBR row's pseudo-references, sampled from the inverter
    mbr_utility: str = DEFAULT_UTILITY  # see attacks.mbr.UTILITIES
    seed: int = 0  # the inverter's sampling (MBR)
    search_with: tuple = ()  # more inverters (checkpoints) for the search: own turns (user: one)
    search_shortlist: int | None = None  # later turns judge only the best so far (search.judge)
    search_neighbours: int = 8  # memorised prompts each inverter proposes to the search
    search_samples: int = 0  # prompts each inverter samples for the search (seeded by `seed`)
    search_rounds: int = 0  # conditioned rounds of the search (search.observe_and_search)
    search_task_guesses: bool = True  # a reply describing the task as a guess (search.py)
    near: list[list[int]] | None = None
    notes: dict = field(default_factory=dict)  # side results: best_attack, fallback_kept
    _decoded: dict = field(default_factory=dict, repr=False)
    _replies: list[str] | None = field(default=None, repr=False)
    _neighbours: int = field(default=1, repr=False)

    def __len__(self) -> int:
        return len(self.vectors)

    def available(self) -> set[str]:
        """The needs (keys of NEEDS) this context meets."""
        have = {
            "inverter": self.inverter is not None,
            "target": self.target is not None,
            "references": self.references is not None,
            "text_checkpoint": bool(self.text_checkpoint),
            "train": self.train is not None,
            "store": self.train is not None and getattr(self.train, "steps", 0) > 0,
        }
        return {k for k, v in have.items() if v}

    def decode(self, beams: int, returns: int = 1) -> list[list[str]]:
        """The inverter's `returns` best of `beams` beams per row (memoised per pair)."""
        return self._memo_decode(
            (beams, returns),
            self.decode_batch_size or self.batch_size,
            num_beams=beams,
            num_return_sequences=returns,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
        )

    def samples(self, n: int) -> list[list[str]]:
        """`n` prompts sampled from the inverter per row (memoised; seeded by `seed`, without
        touching the caller's random state)."""
        with seeded(self.seed):
            return self._memo_decode(
                ("sample", n),
                sample_rows(self.decode_batch_size or self.batch_size, n),
                num_return_sequences=n,
                **SAMPLING,
            )

    def _memo_decode(self, key: tuple, size: int, **generate) -> list[list[str]]:
        """The inverter's decode of every row in batches of `size` rows (a list per row),
        memoised under `key`."""
        if key not in self._decoded:
            from ..attacks.invert import invert_batches
            from ..attacks.nearest import observed_steps

            def invert(chunk: torch.Tensor) -> list[list[str]]:
                return self.inverter.invert(
                    chunk,
                    steps=observed_steps(chunk),
                    batch_size=size,
                    bf16=self.bf16,
                    grouped=True,
                    **generate,
                )

            chunks = (self.vectors[s : s + size] for s in range(0, len(self), size))
            self._decoded[key] = invert_batches(invert, chunks, len(self), self.progress)
        return self._decoded[key]

    def beams(self) -> list[list[str]]:
        """The inverter's own decode: all `num_beams` beams when another method reads them
        (`keep_beams`), else the top one, per row."""
        return self.decode(self.num_beams, self.num_beams if self.keep_beams else 1)

    def inverter_output(self) -> list[str]:
        """The inverter's answer per row: the top of its own decode."""
        return [row[0] for row in self.beams()]

    def replies(self) -> list[str]:
        """The reply each observation was read from: every step's most likely token (the
        greedy continuation), up to the first end of turn, as the target's tokenizer writes it."""
        if self._replies is None:
            tokenizer, vocab = self.target.tokenizer, self.target.vocab_size
            vectors = np.asarray(self.vectors)
            if vectors.shape[-1] != vocab:
                raise Logit2PromptError(
                    f"the observed reply needs whole distributions over the target's {vocab} "
                    f"tokens; these observations hold {vectors.shape[-1]} per step"
                )
            ids = vectors.reshape(len(self), -1, vocab).argmax(-1)
            stops = {tokenizer.eos_token_id, *getattr(tokenizer, "all_special_ids", ())}
            texts = []
            for row in ids.tolist():
                end = next((i for i, t in enumerate(row) if t in stops), len(row))
                texts.append(tokenizer.decode(row[:end], skip_special_tokens=True).strip())
            self._replies = texts
        return self._replies

    def nearest(self, k: int = 1) -> list[list[int]]:
        """Each row's k nearest training indices, closest first, from one shared search."""
        from ..attacks.nearest import nearest_neighbours

        if self.near is None or any(len(row) < k for row in self.near):
            self.near = nearest_neighbours(self.train, self.vectors, max(k, self._neighbours))
        return [row[:k] for row in self.near]


@dataclass(frozen=True)
class Method:
    """One way to predict the hidden prompts: `predict(ctx)` returns {row name: predictions}
    for the rows in `names`; `needs` are keys of NEEDS; `neighbours` the nearest training
    prompts it reads per row; `beams(ctx)` the beam count it decodes, if it decodes any (it
    then shares the inverter's decode when the counts match)."""

    key: str
    names: tuple[str, ...]
    predict: Callable[[MethodContext], dict[str, list[str]]]
    needs: frozenset[str] = frozenset()
    help: str = ""
    neighbours: int = 0
    beams: Callable[[MethodContext], int] | None = None
    # Whether it reads the observation (the reply to the attacker's innocuous turn): under a
    # leak filter, a reply the filter refuses is one the attacker never observes.
    observes: bool = True


_REGISTRY: dict[str, Method] = {}


def register(method: Method, *, replace: bool = False) -> Method:
    """Add a method (after those registered before it: rows run and show in that order)."""
    unknown = set(method.needs) - set(NEEDS)
    if unknown:
        raise ValueError(f"method {method.key!r} needs {sorted(unknown)}; known: {list(NEEDS)}")
    if method.key in _REGISTRY and not replace:
        raise ValueError(f"a method {method.key!r} is registered already (pass replace=True)")
    _REGISTRY[method.key] = method
    return method


def unregister(key: str) -> Method:
    """Remove a registered method and return it."""
    return _REGISTRY.pop(key)


def method_keys() -> tuple[str, ...]:
    """Registered method keys, in registration (= run and report) order."""
    return tuple(_REGISTRY)


def get_method(key: str) -> Method:
    if key not in _REGISTRY:
        raise Logit2PromptError(f"unknown method {key!r}; choose from {method_keys()}")
    return _REGISTRY[key]


def check_requirements(
    keys: Iterable[str], available: Iterable[str], hints: dict[str, str] | None = None
) -> None:
    """Logit2PromptError naming every selected method whose needs are not `available`, what
    it lacks and (from `hints`, by need) how to provide it."""
    keys, have, hints = list(keys), set(available), hints or {}
    problems = []
    for need, what in NEEDS.items():
        lacking = sorted(k for k in keys if need in get_method(k).needs and need not in have)
        if lacking:
            hint = f": {hints[need]}" if need in hints else ""
            problems.append(f"method(s) {lacking} need {what}{hint}")
    if problems:
        raise Logit2PromptError("; ".join(problems))


def run_methods(keys: Iterable[str], ctx: MethodContext) -> dict[str, list[str]]:
    """Every selected method's rows, run and returned in registration order."""
    wanted = set(keys)
    for k in wanted:  # unknown keys fail before any work
        get_method(k)
    methods = [m for k, m in _REGISTRY.items() if k in wanted]
    check_requirements(wanted, ctx.available())
    # Plan the shared work: one neighbour search wide enough for all, and the inverter's own
    # decode keeps every beam when another method reads the same beams.
    ctx._neighbours = max([ctx._neighbours, *(m.neighbours for m in methods)])
    if any(m.beams is not None and m.beams(ctx) == ctx.num_beams for m in methods):
        ctx.keep_beams = True
    preds: dict[str, list[str]] = {}
    for m in methods:
        rows = m.predict(ctx)
        if set(rows) != set(m.names):
            raise Logit2PromptError(f"method {m.key!r} returned {list(rows)}, not {m.names}")
        preds.update(rows)
    observing = [n for m in methods if m.observes for n in m.names]
    guarded = ctx.leak_filter is not None and ctx.target is not None
    if observing and guarded and ctx.references is not None:
        _withhold_refused(ctx, observing, preds)
    return preds


def _withhold_refused(ctx: MethodContext, rows: list[str], preds: dict[str, list[str]]) -> None:
    """The leak filter sees the observed reply too: where it refuses it, the attacker gets
    the refusal and no log-probs, so every row that reads the observation answers ""."""
    leak = ctx.leak_filter
    refused = [leak.blocks(r, p) for r, p in zip(ctx.replies(), ctx.references, strict=True)]
    ctx.notes["observation_refused"] = {"refused": sum(refused), "n": len(refused)}
    if any(refused):
        logger.info("leak filter: %d of %d observed replies refused", sum(refused), len(ctx))
    for name in rows:
        preds[name] = ["" if r else p for r, p in zip(refused, preds[name], strict=True)]


# ----------------------------------------------------------------- the built-in methods
INVERTER = "inverter"
FALLBACK = "inverter, else the nearest where unsure (no target queries)"
RERANKED = f"inverter + {DEFAULT_NEIGHBOURS} nearest, re-ranked by the target"
REFINED = "nearest neighbour, refined by the target"
NEAREST = "nearest neighbour"
CONSTANT = "constant guess"
EXTRACTION_BEST, EXTRACTION_ORACLE = "extraction (best string)", "extraction (oracle)"
FEWSHOT = "few-shot"
TEXT = "text-only inversion"
REPLY = "the observed reply itself"
MBR = "inverter, minimum-Bayes-risk choice among its samples"
SEARCH = "candidates judged by the target on every observed turn"


def _inverter(ctx: MethodContext) -> dict[str, list[str]]:
    logger.info("inverting %d prompts", len(ctx))
    return {INVERTER: ctx.inverter_output()}


def _mbr(ctx: MethodContext) -> dict[str, list[str]]:
    from ..attacks.mbr import mbr_select

    if ctx.mbr_samples < 2:
        raise Logit2PromptError(f"MBR needs at least 2 samples per prompt, got {ctx.mbr_samples}")
    logger.info(
        "MBR: %d samples per prompt from the inverter, utility %s", ctx.mbr_samples, ctx.mbr_utility
    )
    greedy = ctx.inverter_output()
    return {MBR: mbr_select(greedy, ctx.samples(ctx.mbr_samples), ctx.mbr_utility)}


def _search(ctx: MethodContext) -> dict[str, list[str]]:
    from ..attacks.search import observe_and_search
    from ..models.inverter import Inverter

    others = [Inverter.from_pretrained(c) for c in ctx.search_with]
    logger.info("search: candidates of %d inverter(s), judged by the target", 1 + len(others))
    # The inverter's own greedy decode, if that is what its row is, is the search's first
    # proposal, decoded only where the search observes the same log-probs.
    greedy = ctx.num_beams == 1 and not ctx.no_repeat_ngram_size
    found = observe_and_search(
        [ctx.inverter, *others],
        ctx.references,
        leak_filter=ctx.leak_filter,
        batch_size=ctx.batch_size,
        bf16=ctx.bf16,
        shortlist=ctx.search_shortlist,
        neighbours=ctx.search_neighbours,
        samples=ctx.search_samples,
        seed=ctx.seed,
        rounds=ctx.search_rounds,
        task_guesses=ctx.search_task_guesses,
        target=ctx.target,
        decoded=(ctx.vectors, ctx.inverter_output) if greedy else None,
        progress=ctx.progress,
    )
    logger.info(
        "search: %.1f (candidate, turn) pairs judged per prompt", found.judged / max(1, len(ctx))
    )
    return {SEARCH: found.chosen}


def _fallback(ctx: MethodContext) -> dict[str, list[str]]:
    from ..attacks.rerank import confident_or_nearest

    logger.info("falling back to the nearest train prompt where the inverter is unsure")
    answers, kept = confident_or_nearest(
        ctx.inverter,
        ctx.train,
        ctx.vectors,
        ctx.inverter_output(),
        ctx.confidence_nats,
        near=ctx.nearest(1),
        batch_size=ctx.batch_size,
        progress=ctx.progress,
    )
    ctx.notes["fallback_kept"] = kept
    logger.info("the inverter was confident of %d of its %d outputs", int(kept.sum()), len(kept))
    return {FALLBACK: answers}


def _rerank(ctx: MethodContext) -> dict[str, list[str]]:
    from ..attacks.rerank import proposals_with_neighbours

    logger.info(
        "re-ranking %d inverter beams and the %d nearest train prompts with the target",
        ctx.rerank_beams,
        DEFAULT_NEIGHBOURS,
    )
    proposals = ctx.decode(ctx.rerank_beams, ctx.rerank_beams)
    near = ctx.nearest(DEFAULT_NEIGHBOURS)
    return {
        RERANKED: proposals_with_neighbours(
            ctx.target, ctx.train, ctx.vectors, proposals, DEFAULT_NEIGHBOURS, ctx.batch_size, near
        )
    }


def _refine(ctx: MethodContext) -> dict[str, list[str]]:
    from ..attacks.refine import RefineConfig, refine_nearest

    if ctx.refine_rounds < 1:
        raise Logit2PromptError(f"refinement needs at least 1 round, got {ctx.refine_rounds}")
    logger.info("refining nearest neighbours with the target (%d rounds)", ctx.refine_rounds)
    cfg = RefineConfig(rounds=ctx.refine_rounds, target_batch=ctx.batch_size)
    near = [row[0] for row in ctx.nearest(1)]  # the shared neighbour search
    _, refined = refine_nearest(
        ctx.inverter, ctx.target, ctx.train, ctx.vectors, cfg, ctx.progress, near=near
    )
    return {REFINED: refined.prompts}


def _nearest(ctx: MethodContext) -> dict[str, list[str]]:
    logger.info("nearest neighbour")
    return {NEAREST: [ctx.train.prompts[row[0]] for row in ctx.nearest(1)]}


def _reply(ctx: MethodContext) -> dict[str, list[str]]:
    return {REPLY: ctx.replies()}


def _constant(ctx: MethodContext) -> dict[str, list[str]]:
    from ..attacks.nearest import constant_guess

    return {CONSTANT: [constant_guess(ctx.train.prompts)] * len(ctx)}


def _extraction(ctx: MethodContext) -> dict[str, list[str]]:
    from ..attacks.extraction import best_and_oracle, extraction_predictions, load_attacks

    attacks = (
        list(ctx.attacks) if isinstance(ctx.attacks, list | tuple) else load_attacks(ctx.attacks)
    )
    logger.info("extraction attacks: %d strings", len(attacks))
    replies = extraction_predictions(ctx.target, ctx.references, attacks)
    if ctx.leak_filter is not None:
        # The deployment refuses replies that repeat the prompt: that is what the attack gets.
        leak, refused, mask = ctx.leak_filter, {}, {}
        for attack, texts in replies.items():
            blocked = [leak.blocks(r, p) for r, p in zip(texts, ctx.references, strict=True)]
            refused[attack], mask[attack] = sum(blocked), blocked
            replies[attack] = [
                leak.refusal if b else r for b, r in zip(blocked, texts, strict=True)
            ]
        ctx.notes["extraction_refused"] = {"per_attack": refused, "n": len(ctx.references)}
        ctx.notes["extraction_blocked"] = mask  # per attack, per prompt
    best, best_preds, oracle = best_and_oracle(replies, ctx.references)
    ctx.notes["best_attack"] = best
    return {EXTRACTION_BEST: best_preds, EXTRACTION_ORACLE: oracle}


def _fewshot(ctx: MethodContext) -> dict[str, list[str]]:
    from ..attacks.fewshot import DEFAULT_SHOTS, fewshot_predictions

    logger.info("few-shot prompting")
    train = ctx.train
    idx = sorted(np.random.default_rng(0).choice(len(train), DEFAULT_SHOTS, replace=False).tolist())
    shots = [(train.prompts[i], torch.from_numpy(train.vectors([i])[0, 0])) for i in idx]
    vectors = torch.from_numpy(np.asarray(ctx.vectors)[:, 0])
    return {FEWSHOT: fewshot_predictions(ctx.target, vectors, shots)}


def _text(ctx: MethodContext) -> dict[str, list[str]]:
    from ..models.text_inverter import TextInverter, target_outputs

    model = TextInverter.from_pretrained(ctx.text_checkpoint)
    if model.fingerprint and model.fingerprint.get("id") != ctx.target.fingerprint.id:
        raise Logit2PromptError(
            f"the text inverter {ctx.text_checkpoint} was trained on another target "
            f"({model.fingerprint.get('name')}, id {model.fingerprint.get('id')})"
        )
    logger.info("text-only inversion: generating the target's replies")
    return {TEXT: model.invert(target_outputs(ctx.target, ctx.references))}


for _method in (
    Method("inverter", (INVERTER,), _inverter, frozenset({"inverter"}), "the inverter's output"),
    Method(
        "mbr",
        (MBR,),
        _mbr,
        frozenset({"inverter"}),
        "of the inverter's greedy output and samples, the one that agrees most with the samples "
        "by the metrics (no target queries)",
    ),
    Method(
        "search",
        (SEARCH,),
        _search,
        frozenset({"inverter", "target", "references"}),
        "the inverter's (and --search-with inverters') outputs and memory neighbours, judged by "
        "the target's KL on the replies to each inverter's innocuous turn",
        # It observes each turn itself; a refused turn is one it does not read.
        observes=False,
    ),
    Method(
        "fallback",
        (FALLBACK,),
        _fallback,
        frozenset({"inverter", "train"}),
        "the inverter's output where it is confident, else the nearest train prompt",
        neighbours=1,
    ),
    Method(
        "rerank",
        (RERANKED,),
        _rerank,
        frozenset({"inverter", "train", "target"}),
        f"the inverter's beams + the {DEFAULT_NEIGHBOURS} nearest, re-ranked by the target",
        neighbours=DEFAULT_NEIGHBOURS,
        beams=lambda ctx: ctx.rerank_beams,
    ),
    Method(
        "refine",
        (REFINED,),
        _refine,
        frozenset({"inverter", "train", "target"}),
        "the nearest train prompt, edited token by token where the target says it is closer",
        neighbours=1,
    ),
    Method(
        "nn", (NEAREST,), _nearest, frozenset({"train"}), "the nearest train prompt", neighbours=1
    ),
    Method(
        "reply",
        (REPLY,),
        _reply,
        frozenset({"target"}),
        "the greedy reply the log-probs were read from, as a guess (no learning)",
    ),
    Method(
        "constant",
        (CONSTANT,),
        _constant,
        frozenset({"train"}),
        "the train medoid",
        observes=False,
    ),
    Method(
        "extraction",
        (EXTRACTION_BEST, EXTRACTION_ORACLE),
        _extraction,
        frozenset({"target", "references"}),
        "ask the target to repeat its prompt: the best string, and the per-prompt oracle",
        observes=False,
    ),
    Method(
        "fewshot",
        (FEWSHOT,),
        _fewshot,
        frozenset({"train", "store", "target"}),
        "few-shot the target",
    ),
    Method(
        "text",
        (TEXT,),
        _text,
        frozenset({"target", "references", "text_checkpoint"}),
        "invert the target's text reply",
        observes=False,
    ),
):
    register(_method)
