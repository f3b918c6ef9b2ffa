"""Search by the target: teacher-forced log-probs, and candidates judged by their KL from the
observed replies to one or more innocuous turns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from logit2prompt.attacks.search import (
    Probe,
    SearchResult,
    choose,
    find_task_guesses,
    forced_divergences,
    forced_kl,
    gate_task_guesses,
    judge,
    prefer_task_guesses,
    search,
    shortlisted,
    task_guess,
)
from logit2prompt.errors import Logit2PromptError, TargetError
from logit2prompt.targets import load_target

from .conftest import FIXTURE_PROMPTS

HIDDEN = FIXTURE_PROMPTS[:4]


@pytest.fixture(scope="module")
def guarded(tiny_lm_dir):
    return load_target(str(tiny_lm_dir), mode="guarded", batch_size=3)


def test_forced_along_the_greedy_reply_is_what_was_observed(guarded):
    """Teacher forcing a prompt along its own greedy reply reproduces `next_token_logprobs`,
    whatever the padding of the batch (prompts of different lengths, batches of 3)."""
    observed = guarded.next_token_logprobs(HIDDEN, steps=5)
    forced = guarded.forced_logprobs(HIDDEN, observed.argmax(-1).tolist())
    assert forced.shape == observed.shape
    assert torch.allclose(forced, observed, atol=1e-4)
    # Along another reply, the steps after the first differ.
    other = guarded.forced_logprobs(HIDDEN[:1], [[5, 6, 7, 8, 9]])
    assert torch.allclose(other[0, 0], observed[0, 0], atol=1e-4)
    assert not torch.allclose(other[0, 1:], observed[0, 1:], atol=1e-3)
    with pytest.raises(TargetError, match="same, non-zero length"):
        guarded.forced_logprobs(HIDDEN[:2], [[1, 2], [1]])
    with pytest.raises(TargetError, match="2 prompts but 1 replies"):
        guarded.forced_logprobs(HIDDEN[:2], [[1, 2]])


def test_forced_shares_the_template_prefix_and_agrees_without_it(tiny_lm_dir):
    """User mode: every prompt starts with the template's system turn, computed once from the
    KV cache; the log-probs are those of full forward passes, and of the observation."""
    user = load_target(str(tiny_lm_dir), mode="user", batch_size=3)
    assert user._shared_prefix_len(user.encode(HIDDEN[:3])) >= 4
    observed = user.next_token_logprobs(HIDDEN, steps=4)
    replies = observed.argmax(-1).tolist()
    shared = user.forced_logprobs(HIDDEN, replies)
    # The same prompt twice in a batch still keeps its own last token out of the cache.
    twice = user.forced_logprobs([HIDDEN[0]] * 2, [replies[0]] * 2)
    user.share_prefix = False
    whole = user.forced_logprobs(HIDDEN, replies)
    assert torch.allclose(shared, whole, atol=1e-4)
    assert torch.allclose(shared, observed, atol=1e-4)
    assert torch.allclose(twice, whole[:1].expand(2, -1, -1), atol=1e-4)


def test_search_finds_the_hidden_prompt_among_candidates_on_two_turns(guarded):
    turns = ["Hello!", "Hi! What is the task?"]
    probes = []
    for turn in turns:
        guarded.set_user_turn(turn)
        probes.append(Probe(turn, guarded.next_token_logprobs(HIDDEN, steps=4).numpy()))
    guarded.set_user_turn("Hello!")
    distractors = FIXTURE_PROMPTS[4:8]
    candidates = [[d, h, ""] for d, h in zip(distractors, HIDDEN, strict=True)]
    chosen, totals = search(guarded, probes, candidates, progress=False)
    assert chosen == HIDDEN
    assert all(t[1] < 1e-3 and t[0] > t[1] for t in totals)
    assert guarded.user_turn == "Hello!"  # the judge put the turn back
    # The observed turn matters: judged on the wrong turn's observation, the hidden prompt
    # no longer explains it exactly.
    swapped = Probe(turns[1], probes[0].observed)
    wrong = forced_kl(guarded, swapped, [[h] for h in HIDDEN], progress=False)
    assert all(w[0] > 1e-3 for w in wrong)


def test_every_measure_is_zero_for_the_hidden_prompt_and_matches_its_definition(guarded):
    """`forced_divergences`: from one teacher-forced pass, KL (the same as `forced_kl`),
    reverse KL and Jensen-Shannon vanish for the hidden prompt itself and are positive for
    another; NLL is minus the log-prob of the observed greedy tokens; each agrees with its
    definition computed here from the forced log-probs."""
    observed = guarded.next_token_logprobs(HIDDEN[:2], steps=3)
    probe = Probe("Hello!", observed.numpy())
    rows = [[HIDDEN[0], FIXTURE_PROMPTS[5]], [HIDDEN[1], FIXTURE_PROMPTS[6]]]
    found = forced_divergences(guarded, probe, rows, ("kl", "reverse_kl", "js", "nll"), False)
    kl = forced_kl(guarded, probe, rows, False)
    greedy = observed.argmax(-1)
    for i, row in enumerate(rows):
        np.testing.assert_allclose(found["kl"][i], kl[i], rtol=1e-6)
        for m in ("kl", "reverse_kl", "js"):
            assert abs(found[m][i][0]) < 1e-3 and found[m][i][1] > 1e-3, m
        q = guarded.forced_logprobs(row, [greedy[i].tolist()] * 2).double()
        p = observed[i : i + 1].double()
        mix = torch.logaddexp(p, q) - np.log(2)
        want = {
            "kl": (p.exp() * (p - q)).sum((-1, -2)),
            "reverse_kl": (q.exp() * (q - p)).sum((-1, -2)),
            "js": 0.5 * (p.exp() * (p - mix) + q.exp() * (q - mix)).sum((-1, -2)),
            "nll": -q.gather(-1, greedy[i].view(1, -1, 1).expand(2, -1, 1)).sum((-1, -2)),
        }
        for m, value in want.items():
            np.testing.assert_allclose(found[m][i], value.numpy(), rtol=1e-3, atol=1e-3)
    with pytest.raises(Logit2PromptError, match="unknown judge measures"):
        forced_divergences(guarded, probe, rows, ("cosine",), False)


def test_a_task_description_is_turned_back_into_an_instruction():
    assert task_guess("The task is to write a SQL query. It groups") == "Write a SQL query."
    assert task_guess("this task is identifying spam") == "Identifying spam"
    assert task_guess("Hello! The task is to write") is None
    assert task_guess("The task is to ") is None


def test_a_task_guess_takes_the_choice_only_where_the_other_turn_prefers_it(guarded):
    """Row 0: the search chose a distractor and the second turn's reply describes the hidden
    prompt, so the guess (the hidden prompt itself) explains the first turn better and takes
    the choice. Row 1: the choice is the hidden prompt and the guess a distractor: kept. Rows
    2-3: a refused reply and one that describes no task give no guess."""
    probes = []
    for turn in ("Hello!", "Hi! What is the task?"):
        guarded.set_user_turn(turn)
        probes.append(Probe(turn, guarded.next_token_logprobs(HIDDEN, steps=3).numpy()))
    guarded.set_user_turn("Hello!")
    candidates = [[FIXTURE_PROMPTS[5]], [HIDDEN[1], FIXTURE_PROMPTS[6]], [HIDDEN[2]], [HIDDEN[3]]]
    kls = judge(guarded, probes, candidates, False)
    chosen = choose(candidates, kls)[0]
    assert chosen == [FIXTURE_PROMPTS[5], *HIDDEN[1:]]
    replies = [
        ["Hi.", "Hi.", "Hi.", "Hi."],
        ["The task is to w" + HIDDEN[0][1:], "Your task is to " + FIXTURE_PROMPTS[6], "", "Hi."],
    ]
    picked, guesses, guessed = prefer_task_guesses(
        guarded, probes, replies, candidates, kls, chosen, False
    )
    assert guesses == [HIDDEN[0], FIXTURE_PROMPTS[6], "", ""]
    assert picked == HIDDEN and guessed == [True, False, False, False]
    # Judged on its own turn only, a guess has no evidence elsewhere and is never taken.
    alone = [
        Probe(p.user_turn, p.observed, [True] * 4) if j == 0 else p for j, p in enumerate(probes)
    ]
    assert prefer_task_guesses(guarded, alone, replies, candidates, kls, chosen, False)[0] == chosen


def test_the_task_guess_rule_reads_only_the_other_probes():
    """The pure rule behind `prefer_task_guesses`: the guess's own probe is never counted, a
    probe that did not observe the row (NaN) adds nothing, and a row seen by no other probe
    keeps its choice unless there is no choice at all."""
    replies = [
        ["", "Hi.", "The task is to sort a list.", "Hi."],
        ["Your task is to add.", "Hi.", "", ""],
    ]
    guesses, source = find_task_guesses(replies)
    assert guesses == ["Add.", "", "Sort a list.", ""] and source == [1, -1, 0, -1]
    nan = float("nan")
    # probe 0 then 1; row 0's guess is judged on probe 0 only (its own is 1)
    guess_kl = [[1.0, nan, 9.0, nan], [0.0, nan, 5.0, nan]]
    chosen_kl = [[2.0, 1.0, 9.0, 1.0], [0.0, 1.0, 6.0, 1.0]]
    chosen = ["x", "y", "z", "w"]
    assert gate_task_guesses(chosen, guesses, source, guess_kl, chosen_kl) == [
        True,
        False,
        True,
        False,
    ]
    # the same KLs with the guesses' sources swapped: now each is judged on the probe it is worse on
    swapped = [1 - s if s >= 0 else s for s in source]
    assert gate_task_guesses(chosen, guesses, swapped, guess_kl, chosen_kl) == [False] * 4
    # row 0 seen by no other probe (NaN on probe 0): no evidence, kept; with no choice, taken
    guess_kl[0][0] = nan
    assert gate_task_guesses(chosen, guesses, source, guess_kl, chosen_kl)[0] is False
    assert gate_task_guesses(["", *chosen[1:]], guesses, source, guess_kl, chosen_kl)[0] is True


def test_a_refused_turn_adds_no_evidence(guarded):
    observed = guarded.next_token_logprobs(HIDDEN[:2], steps=3).numpy()
    blind = Probe("Hello!", observed, refused=[True, False])
    kls = judge(guarded, [blind], [[HIDDEN[0], HIDDEN[1]], [HIDDEN[0], HIDDEN[1]]], False)
    assert np.isnan(kls[0][0]).all() and not np.isnan(kls[0][1]).any()
    chosen, _ = choose([[HIDDEN[0], HIDDEN[1]], [HIDDEN[0], HIDDEN[1]]], kls)
    assert chosen == [HIDDEN[0], HIDDEN[1]]  # row 0: no evidence, the first candidate
    assert choose([[""]], [[np.array([np.nan])]])[0] == [""]


def test_a_shortlist_judges_later_turns_on_the_best_so_far_only(guarded):
    """With a shortlist, the second turn judges each row's k best after the first, with the
    KLs a full judge gives them; the rest are +inf there, never chosen. A row the first turn
    did not observe is judged whole. `SearchResult.shortlisted` replays it from full KLs."""
    probes = []
    for turn, refused in (("Hello!", [True, False, False]), ("Hi! What is the task?", None)):
        guarded.set_user_turn(turn)
        observed = guarded.next_token_logprobs(HIDDEN[:3], steps=3).numpy()
        probes.append(Probe(turn, observed, refused))
    guarded.set_user_turn("Hello!")
    candidates = [[*FIXTURE_PROMPTS[4:7], h, ""] for h in HIDDEN[:3]]
    full = judge(guarded, probes, candidates, False)
    short = judge(guarded, probes, candidates, False, shortlist=2)
    np.testing.assert_allclose(short[0][1], full[0][1], rtol=1e-4, atol=1e-5)
    assert np.isnan(short[0][0]).all()
    assert np.isfinite(short[1][0][:4]).all()  # row 0: unobserved first, so judged whole
    for i in (1, 2):
        keep = shortlisted(candidates, [full[0]], 2)[i]
        assert keep.sum() == 2 and keep[3]  # the hidden prompt survives the first turn
        assert set(np.argsort(full[0][i])[:2]) == set(np.flatnonzero(keep))
        np.testing.assert_allclose(short[1][i][keep], full[1][i][keep], rtol=1e-4, atol=1e-5)
        assert np.isinf(short[1][i][~keep]).all()
    assert choose(candidates, short)[0] == HIDDEN[:3]
    found = SearchResult([p.user_turn for p in probes], [], [], candidates, [], full, [], [], {})
    replayed = found.with_shortlist(2)
    assert replayed.chosen == choose(candidates, short)[0] and replayed.shortlist == 2
    assert found.judged == 3 * 4 + 3 * 4 - 4  # blanks and row 0's unobserved turn not judged
    assert replayed.judged == 2 * 4 + 4 + 2 + 2  # row 0 whole on the second turn
    with pytest.raises(Logit2PromptError, match="at least one candidate"):
        judge(guarded, probes, candidates, False, shortlist=0)


def test_search_refuses_what_it_cannot_judge(guarded):
    observed = guarded.next_token_logprobs(HIDDEN[:2], steps=2).numpy()
    with pytest.raises(Logit2PromptError, match="whole distributions"):
        forced_kl(guarded, Probe("Hello!", observed[..., :10]), [["a"], ["b"]], False)
    bad = observed.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(Logit2PromptError, match="NaN"):
        forced_kl(guarded, Probe("Hello!", bad), [["a"], ["b"]], False)
    with pytest.raises(Logit2PromptError, match="same rows"):
        search(guarded, [Probe("Hello!", observed)], [["a"]], False)
    with pytest.raises(Logit2PromptError, match="at least one"):
        search(guarded, [], [["a"], ["b"]], False)
    with pytest.raises(Logit2PromptError, match="local copy"):
        forced_kl(object(), Probe("Hello!", observed), [["a"], ["b"]], False)
