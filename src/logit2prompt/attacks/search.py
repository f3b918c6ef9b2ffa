"""Search by the target over several observations: pick, among candidate prompts from any
source, the one under which the attacker's own copy of the target best explains every reply
it observed.

In user mode there is one observation, the reply to the hidden prompt itself; its words are
often the best guess there ("Developing anorexia is ..."), and the judge chooses between them
and the inverter's candidates.

A guarded deployment answers an innocuous turn ("Hello!", "Hi! What is the task?") with a reply
that says little in its words, but its log-probs, step by step, depend on the hidden prompt.
For each candidate the local target is run once per observed turn, teacher-forced along the
observed greedy reply, and the candidate's score is the summed KL divergence from the observed
distributions to its own (zero for the hidden prompt itself). Candidates come from inverters
(their greedy output, the nearest prompts in their memories and, optionally, samples), each
reading the observation it was trained on; the judge reads all of them. No queries beyond
the observed turns: the judging runs on the attacker's copy of the model, so it needs
white-box weights (an open model such as the default target). Unlike `rerank`, which
compares the candidate's own greedy continuation, teacher forcing keeps every step aligned
with what was observed. A reply that describes the task ("The task is to ...") becomes one more
guess, set against the choice on the other turns only (`prefer_task_guesses`).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import Logit2PromptError

logger = logging.getLogger(__name__)

# Candidates per forced pass: each holds a few [chunk, steps, vocab] float32 buffers (at 256
# candidates x 16 steps over 49,152 tokens, ~0.8 GB each, a 7.9 GB peak in the demo).
CHUNK = 32
# What a user-mode probe is called where turns are named (its reply answers the hidden prompt).
HIDDEN_TURN = "the hidden prompt"


# User mode also proposes the reply to this many times the judged steps: on 120 BIG-bench
# validation prompts judged on 16 steps, the 32-token reply as one more candidate lifts the
# search from 23.1 to 25.7 BLEU (8 tokens lowers it, 24 adds nothing; benchmarks/README.md).
USER_REPLY_FACTOR = 2


# A guarded deployment asked "What is the task?" describes its system prompt in the third
# person ("The task is to identify the political party affiliation of ..."); hidden system
# prompts are mostly instructions ("Given some political opinions, classify ...").
_TASK_PREFIX = re.compile(r"^\s*(?:the|this|my|your)\s+task\s+(?:here\s+)?is\s+(?:to\s+)?", re.I)


def task_guess(reply: str) -> str | None:
    """A reply that describes its task ("The task is to write a SQL query ...") turned back
    into the instruction it describes ("Write a SQL query ..."; its first sentence), or None
    for a reply that does not start that way. A candidate for the judge, not an answer."""
    found = _TASK_PREFIX.match(reply)
    if found is None:
        return None
    rest = reply[found.end() :].strip()
    first = re.split(r"(?<=[.!?])\s", rest, maxsplit=1)[0].strip()
    return first[0].upper() + first[1:] if first else None


@dataclass
class Probe:
    """One observed turn: the user turn the attacker sent (None in user mode, where the
    hidden prompt is the user turn), the observed log-probs `[n, steps, vocab]` of the reply,
    and (optional) the rows whose reply the deployment refused, for which nothing was
    observed."""

    user_turn: str | None
    observed: np.ndarray
    refused: Sequence[bool] | None = None

    def seen(self, row: int) -> bool:
        return self.refused is None or not self.refused[row]


# What `forced_divergences` can measure per step, summed over the probe's steps, between the
# observed distribution p and the candidate's teacher-forced q: "kl" KL(p || q), the search's
# judge; "reverse_kl" KL(q || p); "js" Jensen-Shannon; "nll" -log q of the observed greedy token.
MEASURES = ("kl", "reverse_kl", "js", "nll")


def forced_kl(
    target,
    probe: Probe,
    candidates: Sequence[Sequence[str]],
    progress: bool = True,
) -> list[np.ndarray]:
    """Per row, per candidate: the summed KL(observed || target given the candidate) over the
    probe's steps, teacher-forced along the observed greedy reply (NaN where the row was not
    observed). `target` is switched to the probe's user turn and back."""
    return forced_divergences(target, probe, candidates, ("kl",), progress)["kl"]


def forced_divergences(
    target,
    probe: Probe,
    candidates: Sequence[Sequence[str]],
    measures: Sequence[str] = ("kl",),
    progress: bool = True,
) -> dict[str, list[np.ndarray]]:
    """`forced_kl` for each of `measures` (`MEASURES`) from one teacher-forced pass: per
    measure, per row, per candidate, summed over the probe's steps (NaN where the row was not
    observed)."""
    unknown = [m for m in measures if m not in MEASURES]
    if unknown or not measures:
        raise Logit2PromptError(f"unknown judge measures {unknown}; choose from {MEASURES}")
    if not hasattr(target, "forced_logprobs"):
        raise Logit2PromptError(
            f"the search judges candidates on a local copy of the target's weights; "
            f"{type(target).__name__} cannot be teacher-forced (load the model itself)"
        )
    observed = np.asarray(probe.observed, dtype=np.float32)
    if observed.ndim != 3 or observed.shape[-1] != target.vocab_size:
        raise Logit2PromptError(
            f"search needs whole distributions [n, steps, {target.vocab_size}]; "
            f"got an observation of shape {observed.shape}"
        )
    if len(candidates) != len(observed):
        raise Logit2PromptError(f"{len(candidates)} candidate rows for {len(observed)} observed")
    if np.isnan(observed).any():
        raise Logit2PromptError("the observed log-probs hold NaN")
    greedy = observed.argmax(-1)  # the reply the deployment sent, as token ids
    pairs = [(i, c) for i, row in enumerate(candidates) if probe.seen(i) for c in row if c.strip()]
    scores = {m: {pair: np.nan for pair in pairs} for m in measures}
    # Chunks of similar length: one long candidate no longer pads a whole chunk to its size.
    pairs.sort(key=lambda pair: len(pair[1]))
    before = target.user_turn
    if probe.user_turn is not None:
        target.set_user_turn(probe.user_turn)
    try:
        chunks = range(0, len(pairs), CHUNK)
        desc = f"judge ({probe.user_turn or HIDDEN_TURN})"
        for start in tqdm(chunks, desc=desc, disable=not progress):
            part = pairs[start : start + CHUNK]
            rows = [i for i, _ in part]
            forced = target.forced_logprobs([c for _, c in part], greedy[rows].tolist())
            obs = torch.from_numpy(observed[rows])
            with torch.inference_mode():
                values = _measure(forced, obs, torch.from_numpy(greedy[rows]), measures)
            for m in measures:
                for pair, value in zip(part, values[m].tolist(), strict=True):
                    scores[m][pair] = value
    finally:
        target.set_user_turn(before)
    return {
        m: [
            np.array([scores[m].get((i, c), np.nan) for c in row], dtype=np.float64)
            for i, row in enumerate(candidates)
        ]
        for m in measures
    }


def _measure(
    forced: torch.Tensor, obs: torch.Tensor, greedy: torch.Tensor, measures: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Each measure of one chunk `[chunk, steps, vocab]`, summed over steps: `[chunk]`.
    `forced` (the candidates' log-probs) is consumed."""
    out = {}
    if "nll" in measures:
        out["nll"] = -forced.gather(-1, greedy.unsqueeze(-1)).squeeze(-1).sum(-1)
    if "reverse_kl" in measures:
        # q * (log q - log p), 0 where q is 0.
        out["reverse_kl"] = (forced - obs).mul_(forced.exp()).nan_to_num_(nan=0.0).sum(-1).sum(-1)
    if "js" in measures:
        log_m = torch.logaddexp(forced, obs) - np.log(2.0)
        half_p = (obs - log_m).mul_(obs.exp()).nan_to_num_(nan=0.0)
        half_q = (forced - log_m).mul_(forced.exp()).nan_to_num_(nan=0.0)
        out["js"] = (half_p.add_(half_q)).mul_(0.5).sum(-1).sum(-1)
        del log_m, half_p, half_q
    if "kl" in measures:
        # In place, one buffer per chunk: p * (obs - forced), where 0 * (-inf) would be NaN
        # (a token the observation gives no mass adds nothing).
        forced.neg_().add_(obs).mul_(obs.exp()).nan_to_num_(nan=0.0)
        out["kl"] = forced.sum(-1).sum(-1)
    return out


def judge(
    target,
    probes: Sequence[Probe],
    candidates: Sequence[Sequence[str]],
    progress: bool = True,
    shortlist: int | None = None,
) -> list[list[np.ndarray]]:
    """`forced_kl` of every candidate on every probe: per probe, per row, per candidate. With
    `shortlist`, every probe after the first judges only each row's `shortlist` best
    candidates so far (`shortlisted`); the others score +inf there."""
    if not probes:
        raise Logit2PromptError("search needs at least one observed turn")
    if any(len(p.observed) != len(candidates) for p in probes):
        raise Logit2PromptError("every probe must observe the same rows as the candidates")
    if shortlist is not None and shortlist < 1:
        raise Logit2PromptError(f"a shortlist keeps at least one candidate, got {shortlist}")
    out: list[list[np.ndarray]] = []
    for probe in probes:
        logger.info("judging candidates on the reply to %r", probe.user_turn or HIDDEN_TURN)
        if not out or shortlist is None:
            out.append(forced_kl(target, probe, candidates, progress))
            continue
        keep = shortlisted(candidates, out, shortlist)
        picked = [
            [c for c, k in zip(r, m, strict=True) if k]
            for r, m in zip(candidates, keep, strict=True)
        ]
        part = forced_kl(target, probe, picked, progress)
        out.append([_spread(kl, m) for kl, m in zip(part, keep, strict=True)])
    return out


def shortlisted(
    candidates: Sequence[Sequence[str]], kls: Sequence[Sequence[np.ndarray]], k: int
) -> list[np.ndarray]:
    """Per row, a mask of the `k` non-blank candidates with the least KL summed over the probes
    judged so far (`kls`, as from `judge`); every candidate of a row no probe observed yet."""
    masks = []
    for i, row in enumerate(candidates):
        seen = [kl[i] for kl in kls if not np.isnan(kl[i]).all()]
        mask = np.array([bool(c.strip()) for c in row])
        if seen:
            total = sum((np.where(np.isnan(kl), np.inf, kl) for kl in seen), np.zeros(len(row)))
            order = [j for j in np.argsort(total, kind="stable") if mask[j]]
            mask = np.zeros(len(row), dtype=bool)
            mask[order[:k]] = True
        masks.append(mask)
    return masks


def _spread(kl: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A shortlist's KLs back in their row's places: +inf where not judged (NaN stays NaN: the
    probe did not observe the row, and adds no evidence)."""
    full = np.full(len(mask), np.nan if np.isnan(kl).all() else np.inf)
    full[mask] = kl
    return full


def choose(
    candidates: Sequence[Sequence[str]],
    kls: Sequence[Sequence[np.ndarray]],
    allowed: Sequence[Sequence[bool]] | None = None,
) -> tuple[list[str], list[np.ndarray]]:
    """Per row, the candidate with the least KL summed over the probes (`judge`'s output, or
    a subset of it) that observed the row ("" for a row with no candidate), and the totals;
    `allowed` (per row, per candidate) leaves some candidates out."""
    chosen, totals = [], []
    for i, row in enumerate(candidates):
        # An unobserved probe (NaN) adds no evidence; a candidate left off a shortlist is +inf.
        total = sum((np.where(np.isnan(kl[i]), 0.0, kl[i]) for kl in kls), np.zeros(len(row)))
        usable = [j for j, c in enumerate(row) if c.strip() and (allowed is None or allowed[i][j])]
        chosen.append(row[min(usable, key=lambda j: total[j])] if usable else "")
        totals.append(total)
    return chosen, totals


def search(
    target,
    probes: Sequence[Probe],
    candidates: Sequence[Sequence[str]],
    progress: bool = True,
    shortlist: int | None = None,
) -> tuple[list[str], list[np.ndarray]]:
    """Per row, the candidate with the least KL summed over the probes that observed it."""
    return choose(candidates, judge(target, probes, candidates, progress, shortlist))


def proposals(
    inverter,
    observed: np.ndarray,
    neighbours: int = 8,
    *,
    batch_size: int = 32,
    bf16: bool = False,
    outputs: Sequence[str] | None = None,
    samples: int = 0,
    seed: int = 0,
) -> tuple[list[list[str]], list[list[str]]]:
    """Per row, an inverter's greedy output (`outputs`, if already decoded from this
    observation), the `neighbours` nearest prompts of its neighbour memory (none without
    one) and `samples` prompts sampled from it (temperature 1, top-k 50, top-p 0.95, seeded by
    `seed` without touching the caller's random state), for `search` to judge; and each one's kind
    ("inverter", "memory", "sample"; a duplicate keeps its first)."""
    from .invert import SAMPLING, sample_rows, seeded
    from .nearest import MemoryNeighbours, nearest_neighbours

    if samples < 0:
        raise Logit2PromptError(f"the search's samples must be >= 0, got {samples}")
    vectors = torch.from_numpy(np.asarray(observed[:, : inverter.config.steps], np.float32))
    if outputs is None:
        outputs = inverter.invert(vectors, batch_size=batch_size, bf16=bf16)
    rows = [[(o, "inverter")] for o in outputs]
    if neighbours and inverter.memory is not None:
        memory = MemoryNeighbours(inverter)
        near = nearest_neighbours(memory, vectors.numpy(), neighbours)
        for row, idx in zip(rows, near, strict=True):
            row.extend((memory.prompts[j], "memory") for j in idx)
    if samples:
        logger.info("sampling %d candidates for each of %d observations", samples, len(rows))
        with seeded(seed):
            drawn = inverter.invert(
                vectors,
                num_return_sequences=samples,
                batch_size=sample_rows(batch_size, samples),
                bf16=bf16,
                grouped=True,
                **SAMPLING,
            )
        for row, texts in zip(rows, drawn, strict=True):
            row.extend((t, "sample") for t in texts)
    kinds = []
    for row in rows:
        first: dict[str, str] = {}  # text -> the kind of its first occurrence, in order
        for text, kind in row:
            first.setdefault(text, kind)
        kinds.append(first)
    return [list(k) for k in kinds], [list(k.values()) for k in kinds]


def conditioned_proposals(
    inverter,
    observed: np.ndarray,
    best: Sequence[Sequence[str]],
    *,
    samples: int = 16,
    seed: int = 0,
    batch_size: int = 16,
    bf16: bool = False,
) -> list[list[str]]:
    """Per row, a retrieval-augmented inverter's greedy output and `samples` samples (as in
    `proposals`) when it reads `best`, the candidates a judge found closest (closest first),
    in place of its memory's nearest: the search's next round edits its best guesses instead
    of memorised prompts. Distinct, non-blank texts, in that order."""
    from .invert import SAMPLING, sample_rows, seeded

    if not inverter.config.neighbours:
        raise Logit2PromptError("a conditioned round needs an inverter that reads neighbours")
    vectors = torch.from_numpy(np.asarray(observed[:, : inverter.config.steps], np.float32))
    greedy = inverter.invert(vectors, neighbours=best, batch_size=batch_size, bf16=bf16)
    drawn: list[list[str]] = [[] for _ in greedy]
    if samples:
        with seeded(seed):
            drawn = inverter.invert(
                vectors,
                neighbours=best,
                num_return_sequences=samples,
                batch_size=sample_rows(batch_size, samples),
                bf16=bf16,
                grouped=True,
                **SAMPLING,
            )
    return [
        [t for t in dict.fromkeys([g, *d]) if t.strip()] for g, d in zip(greedy, drawn, strict=True)
    ]


def least_kl(
    candidates: Sequence[Sequence[str]], kls: Sequence[Sequence[np.ndarray]], k: int
) -> list[list[str]]:
    """Per row, its `k` non-blank candidates with the least summed KL (`choose`'s totals),
    closest first."""
    _, totals = choose(candidates, kls)
    out = []
    for row, total in zip(candidates, totals, strict=True):
        usable = [j for j, c in enumerate(row) if c.strip()]
        out.append([row[j] for j in sorted(usable, key=lambda j: total[j])[:k]])
    return out


@dataclass
class SearchResult:
    """What `observe_and_search` saw and chose, per row: each probe's user turn, its refused
    rows and each inverter's greedy output ("" where refused; in user mode several inverters
    share the one turn), the judged candidates and their
    KL totals, and the chosen prompts (`chosen`; `by_turn`: judged on one turn alone, among
    those it judged). `shortlist`: what later turns judged (None: every candidate). `chosen`
    takes a task guess where `prefer_task_guesses` did; the replays (`with_shortlist`,
    `choose`, `by_turn`) choose among the judged candidates only."""

    turns: list[str]
    refused: list[list[bool]]
    outputs: list[list[str]]
    candidates: list[list[str]]
    # per candidate: "inverter", "memory", "sample" or "reply", ":" its turn
    origins: list[list[str]]
    kls: list[list[np.ndarray]]  # per probe, per row, per candidate (`judge`)
    totals: list[np.ndarray]
    chosen: list[str]
    by_turn: dict[str, list[str]]
    shortlist: int | None = None
    # per row: its task guess ("" none) and whether `chosen` is that guess (`prefer_task_guesses`)
    guesses: list[str] = dataclasses.field(default_factory=list)
    guessed: list[bool] = dataclasses.field(default_factory=list)

    @property
    def judged(self) -> int:
        """How many (candidate, turn) pairs the target judged."""
        return int(sum(np.isfinite(kl).sum() for probe in self.kls for kl in probe))

    def with_shortlist(self, k: int) -> SearchResult:
        """The search had later turns judged only the `k` best after the first (`judge`'s
        `shortlist`), replayed from these KLs: no more target passes."""
        kls = [self.kls[0]]
        for probe in self.kls[1:]:
            keep = shortlisted(self.candidates, kls, k)
            kls.append([_spread(kl[m], m) for kl, m in zip(probe, keep, strict=True)])
        chosen, totals = choose(self.candidates, kls)
        by_turn = _by_turn(self.turns, self.candidates, kls)
        return dataclasses.replace(
            self,
            kls=kls,
            totals=totals,
            chosen=chosen,
            by_turn=by_turn,
            shortlist=k,
            guessed=[False] * len(chosen),
        )

    def choose(self, keep: Callable[[str], bool]) -> list[str]:
        """The choice among the candidates whose origin `keep` accepts (an ablation)."""
        allowed = [[keep(o) for o in row] for row in self.origins]
        return choose(self.candidates, self.kls, allowed)[0]


def observe_and_search(
    inverters: Sequence,
    prompts: Sequence[str],
    *,
    leak_filter=None,
    steps: int = 16,
    neighbours: int = 8,
    batch_size: int = 16,
    bf16: bool = False,
    replies: bool = True,
    longer_replies: Sequence[int] | None = None,
    shortlist: int | None = None,
    samples: int = 0,
    seed: int = 0,
    rounds: int = 0,
    task_guesses: bool = True,
    target=None,
    decoded: tuple[np.ndarray, Sequence[str] | Callable[[], Sequence[str]]] | None = None,
    progress: bool = True,
) -> SearchResult:
    """The whole attack on a local deployment of the inverters' target: ask each inverter's
    innocuous turn once per hidden prompt (reading `steps` steps, more where an inverter needs
    more; `leak_filter` refuses replies that repeat the prompt, and a refused turn is not
    observed), let each inverter propose candidates from the observation it was trained on
    (with `replies`, the observed reply itself is one more: "The task is to ..." can be the
    closest guess), and judge every candidate on every observed turn (with `shortlist`, the
    first inverter's turn judges all, later turns only each row's `shortlist` best so far:
    fewer target passes, see `judge`). The inverters must share one target and mode; their
    user turns differ (each is recorded in its fingerprint). In user mode the only turn is the
    hidden prompt, observed once: every inverter proposes from that one observation.
    `target`: that target already loaded (its user turn is put back), else a copy is loaded.
    `decoded`: an observation of the first inverter's turn and its greedy outputs (or a
    function that decodes them, called only where reused), reused where that observation is
    this one (no second decode). `longer_replies`: more candidates,
    the reply's first N tokens for each N (read further where needed; the judge still reads
    what it read); None: `USER_REPLY_FACTOR` x `steps` in user mode, none in system modes.
    `samples`: each inverter also proposes this many sampled prompts (`proposals`; seeded by
    `seed`); their origin is "sample", so `SearchResult.choose` can leave them out.
    `rounds`: after the judging, each inverter that reads neighbours proposes again (greedy and
    `samples` samples, seeded by `seed` + the round) reading each row's least-KL candidates in
    place of its memory's nearest (`conditioned_proposals`), and the new candidates (origin
    "round N") are judged beside the rest, once per round. `task_guesses`: with several turns,
    a reply that describes the task is turned into the instruction it describes and takes the
    place of the choice where it explains the other turns better (`prefer_task_guesses`)."""
    from ..recipes.methods import MethodContext
    from .invert import target_for, user_turn_of

    if not inverters:
        raise Logit2PromptError("search needs at least one inverter")
    if neighbours < 0:
        raise Logit2PromptError(f"the search's neighbours must be >= 0, got {neighbours}")
    if rounds < 0:
        raise Logit2PromptError(f"the search's rounds must be >= 0, got {rounds}")
    if rounds and not any(inv.config.neighbours for inv in inverters):
        raise Logit2PromptError(
            "the search's conditioned rounds need an inverter that reads neighbours "
            "(config.neighbours > 0); none of these does"
        )
    if target is None:
        target = target_for(inverters[0], batch_size=batch_size)
    before = target.user_turn
    user_mode = [getattr(inv.fingerprint, "mode", None) == "user" for inv in inverters]
    if any(user_mode) and not all(user_mode):
        raise Logit2PromptError("the search's inverters must share one mode; these mix user mode")
    try:
        turns, probes, outputs, refused_all = [], [], [], []
        candidates: list[list[str]] = [[] for _ in prompts]
        origins: list[list[str]] = [[] for _ in prompts]
        sampled: list[list[tuple[str, str]]] = [[] for _ in prompts]
        readings = []  # (inverter, its observation, refused rows, turn) for the rounds
        replies_by_probe: list[list[str]] = []  # each observed turn's replies ("" refused)

        def add(i: int, pairs: list[tuple[str, str]]) -> None:
            """(text, origin) pairs into row i's candidates; a duplicate keeps its first origin."""
            for text, origin in pairs:
                if text not in candidates[i]:
                    candidates[i].append(text)
                    origins[i].append(origin)

        for index, inverter in enumerate(inverters):
            fp = inverter.fingerprint
            turn = user_turn_of(fp.template, target) if fp is not None else None
            if turn is None and not user_mode[0]:
                raise Logit2PromptError(
                    "search needs inverters trained on a user- or system-mode target"
                )
            if turn is not None:
                target.set_user_turn(turn)
            diffs = fp.differences(target.fingerprint)
            if diffs:
                raise Logit2PromptError(f"the inverters' targets differ: {'; '.join(diffs)}")
            # User mode: one turn, the hidden prompt, observed once for all the inverters.
            observe = not (user_mode[0] and index)
            if observe:
                logger.info("observing %d replies to %r", len(prompts), turn or HIDDEN_TURN)
                # The judge reads `steps`; an inverter needs at least the steps it was
                # trained on (in user mode every inverter reads this one observation).
                reading = inverters if user_mode[0] else [inverter]
                read = max([steps, *(inv.config.steps for inv in reading)])
                longer = (USER_REPLY_FACTOR * steps,) if user_mode[0] else ()
                longer = sorted(
                    {n for n in (longer if longer_replies is None else longer_replies) if n > read}
                )
                full = target.next_token_logprobs(list(prompts), steps=max([read, *longer]))
                observed = full[:, :read].numpy()
                replies_seen = MethodContext(None, observed, target=target).replies()
                more = [
                    MethodContext(None, full[:, :n].numpy(), target=target).replies()
                    for n in longer
                ]
                # The filter reads the longest reply observed, as a deployment's would.
                refused = [
                    leak_filter is not None and leak_filter.blocks(r, p)
                    for r, p in zip(more[-1] if more else replies_seen, prompts, strict=True)
                ]
            given = None
            if decoded is not None and index == 0:
                seen, texts = decoded
                steps_read = inverter.config.steps
                if np.array_equal(np.asarray(seen), observed[:, :steps_read]):
                    given = list(texts() if callable(texts) else texts)
            proposed, proposed_kinds = proposals(
                inverter,
                observed,
                neighbours,
                batch_size=32,
                bf16=bf16,
                outputs=given,
                samples=samples,
                seed=seed,
            )
            for i, (new, kinds, blocked) in enumerate(
                zip(proposed, proposed_kinds, refused, strict=True)
            ):
                if blocked:
                    continue
                tagged = [
                    (t, f"{k}:{turn or HIDDEN_TURN}") for t, k in zip(new, kinds, strict=True)
                ]
                if replies and observe:
                    extra = [r for r in (replies_seen[i], *(m[i] for m in more)) if r]
                    tagged += [(r, f"reply:{turn or HIDDEN_TURN}") for r in extra]
                add(i, [(t, o) for t, o in tagged if not o.startswith("sample:")])
                sampled[i] += [(t, o) for t, o in tagged if o.startswith("sample:")]
            outputs.append(["" if b else row[0] for b, row in zip(refused, proposed, strict=True)])
            if inverter.config.neighbours:
                readings.append((inverter, observed, refused, turn or HIDDEN_TURN))
            if observe:
                turns.append(turn or HIDDEN_TURN)
                probes.append(Probe(turn, observed, refused))
                refused_all.append(refused)
                replies_by_probe.append(
                    ["" if b else r for r, b in zip(replies_seen, refused, strict=True)]
                )
        # Samples go last, so that leaving them out (`SearchResult.choose`) is the search
        # without them: a sample equal to another candidate keeps that one's origin.
        for i, row in enumerate(sampled):
            add(i, row)
        kls = judge(target, probes, candidates, progress, shortlist)
        for r in range(1, rounds + 1):
            new: list[list[str]] = [[] for _ in prompts]
            for inverter, observed, refused, turn in readings:
                best = least_kl(candidates, kls, inverter.config.neighbours)
                rows = [i for i, near in enumerate(best) if not refused[i] and near]
                if not rows:
                    continue
                logger.info("round %d: %s proposes again from the least-KL candidates", r, turn)
                texts = conditioned_proposals(
                    inverter,
                    observed[rows],
                    [best[i] for i in rows],
                    samples=samples,
                    seed=seed + r,
                    batch_size=16,
                    bf16=bf16,
                )
                for i, row in zip(rows, texts, strict=True):
                    new[i] += [t for t in row if t not in candidates[i] and t not in new[i]]
            added = judge(target, probes, new, progress, shortlist)
            for i, row in enumerate(new):
                candidates[i] += row
                origins[i] += [f"round {r}"] * len(row)
                for probe, more in zip(kls, added, strict=True):
                    probe[i] = np.concatenate([probe[i], more[i]])
        chosen, totals = choose(candidates, kls)
        by_turn = _by_turn(turns, candidates, kls)
        guesses, guessed = [""] * len(prompts), [False] * len(prompts)
        if task_guesses and len(probes) > 1:
            chosen, guesses, guessed = prefer_task_guesses(
                target, probes, replies_by_probe, candidates, kls, chosen, progress
            )
        return SearchResult(
            turns,
            refused_all,
            outputs,
            candidates,
            origins,
            kls,
            totals,
            chosen,
            by_turn,
            shortlist,
            guesses,
            guessed,
        )
    finally:
        target.set_user_turn(before)


def find_task_guesses(replies: Sequence[Sequence[str]]) -> tuple[list[str], list[int]]:
    """Per row, the guess (`task_guess`) from the first observed reply (`replies`: per probe,
    per row; "" where refused) that describes its task, and that reply's probe (-1: none)."""
    n = len(replies[0]) if replies else 0
    guesses, source = [""] * n, [-1] * n
    for p, row in enumerate(replies):
        for i, reply in enumerate(row):
            guess = task_guess(reply) if reply and not guesses[i] else None
            if guess:
                guesses[i], source[i] = guess, p
    return guesses, source


def gate_task_guesses(
    chosen: Sequence[str],
    guesses: Sequence[str],
    source: Sequence[int],
    guess_kl: Sequence[Sequence[float]],
    chosen_kl: Sequence[Sequence[float]],
) -> list[bool]:
    """Whether each row's guess replaces the search's choice: the rule of
    `prefer_task_guesses` without the target passes. `guess_kl[p][i]` and `chosen_kl[p][i]`
    are the guess's and the choice's KL on probe p (NaN where the probe did not observe the
    row; the choice's NaN counts 0). Summed over the probes that observed the row, other
    than the guess's own (`source`), the guess must have the lesser KL; no choice at all:
    any guess beats none; no other probe observed the row: no evidence, the choice stays."""
    out = []
    for i, guess in enumerate(guesses):
        mine = theirs = 0.0
        seen_elsewhere = False
        for p, (row_guess, row_chosen) in enumerate(zip(guess_kl, chosen_kl, strict=True)):
            if p == source[i] or np.isnan(row_guess[i]):
                continue  # its own probe, or a row this probe did not observe
            seen_elsewhere = True
            mine += float(row_guess[i])
            theirs += float(np.nan_to_num(row_chosen[i], nan=0.0))
        out.append(bool(guess) and (not chosen[i] or (seen_elsewhere and mine < theirs)))
    return out


def prefer_task_guesses(
    target,
    probes: Sequence[Probe],
    replies: Sequence[Sequence[str]],
    candidates: Sequence[Sequence[str]],
    kls: Sequence[Sequence[np.ndarray]],
    chosen: Sequence[str],
    progress: bool = True,
) -> tuple[list[str], list[str], list[bool]]:
    """Per row, the first observed reply (`replies`: per probe, per row; "" where refused) that
    describes its task gives a guess (`find_task_guesses`), which replaces the search's choice
    where its KL summed over the *other* probes is less than the choice's there
    (`gate_task_guesses`). Not over its own probe: a candidate built from a reply's words
    makes those words near-certain, so its KL from that reply's distributions is biased
    against it (on the OOD dev prompts such guesses ranked near last on their own turn).
    Returns the choices, the guesses ("" none) and whether each choice is its guess. One more
    target pass per guess and other probe."""
    n = len(chosen)
    guesses, source = find_task_guesses(replies)
    out = list(chosen)
    if not any(guesses):
        return out, [""] * n, [False] * n
    guess_kl = np.full((len(probes), n), np.nan)
    chosen_kl = np.full((len(probes), n), np.nan)
    for p, probe in enumerate(probes):
        rows = [[g] if g and source[i] != p else [] for i, g in enumerate(guesses)]
        if not any(rows):
            continue
        kl = forced_kl(target, probe, rows, progress)
        for i, row in enumerate(rows):
            if row:
                guess_kl[p, i] = kl[i][0]
                if chosen[i] in candidates[i]:
                    chosen_kl[p, i] = kls[p][i][candidates[i].index(chosen[i])]
    guessed = gate_task_guesses(chosen, guesses, source, guess_kl, chosen_kl)
    for i, take in enumerate(guessed):
        if take:
            out[i] = guesses[i]
    logger.info("search: a task guess replaces the choice for %d of %d rows", sum(guessed), n)
    return out, guesses, guessed


def _by_turn(turns, candidates, kls) -> dict[str, list[str]]:
    """Each turn alone as the judge, for comparison (no more target passes)."""
    return {t: choose(candidates, [kl])[0] for t, kl in zip(turns, kls, strict=True)}
