"""The OpenAI-compatible server (real subprocess, official client) and API recovery through it."""

from __future__ import annotations

import contextlib
import json
import math
import socket
import sys
import urllib.error
import urllib.request

import openai
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings

from logit2prompt.data.store import read_manifest
from logit2prompt.errors import TargetError
from logit2prompt.server.app import ServerConfig, create_app
from logit2prompt.targets import HFTarget
from logit2prompt.targets.api.target import (
    OpenAITarget,
    QueryBudgetExceeded,
    parse_openai_spec,
)
from logit2prompt.targets.vocab import token_bytes
from logit2prompt.testing import free_port, server_process

PROMPTS = ["What is the capital of France?", "List three prime numbers."]
MODEL = "tiny"


def http(method: str, url: str, body: bytes | None = None, json_body=None) -> tuple[int, dict]:
    """A raw HTTP request (no client-side validation): status and parsed JSON body."""
    headers = {"Content-Type": "application/json"}
    if json_body is not None:
        body = json.dumps(json_body).encode()
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@contextlib.contextmanager
def running_server(model_dir, *args: str):
    """`logit2prompt serve` in a real subprocess on a free loopback port; yields the base URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "logit2prompt.cli.main", "serve", "--target", str(model_dir)]
    cmd += ["--port", str(port), "--model-name", MODEL, *args]
    with server_process(cmd, f"http://127.0.0.1:{port}/openapi.json", timeout=90):
        yield f"http://127.0.0.1:{port}/v1"


@pytest.fixture(scope="module")
def white_box(tiny_lm_dir):
    return HFTarget.from_pretrained(str(tiny_lm_dir), mode="user")


@pytest.fixture(scope="module")
def after_server(tiny_lm_dir):
    with running_server(tiny_lm_dir, "--max-top-logprobs", "5") as url:
        yield url


@pytest.fixture(scope="module")
def before_server(tiny_lm_dir):
    args = ("--max-top-logprobs", "5", "--logprobs-mode", "before")
    with running_server(tiny_lm_dir, *args) as url:
        yield url


@pytest.fixture(scope="module")
def blind_server(tiny_lm_dir):
    with running_server(tiny_lm_dir, "--max-top-logprobs", "0") as url:
        yield url


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0)


def api_target(url, white_box, tmp_path, **kw) -> OpenAITarget:
    return OpenAITarget(
        url, MODEL, tokenizer=white_box.tokenizer, cache_path=tmp_path / "cache.sqlite", **kw
    )


# ----------------------------------------------------------------------------- the server
def test_chat_and_completions_with_official_client(after_server, white_box):
    c = client(after_server)
    assert [m.id for m in c.models.list().data] == [MODEL]
    r = c.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": PROMPTS[0]}],
        logprobs=True,
        top_logprobs=5,
        max_tokens=4,
        temperature=0,
    )
    first = r.choices[0].logprobs.content[0]
    assert len(first.top_logprobs) == 5
    # The exposed values are the white-box distribution of the same chat rendering.
    expected = white_box.next_token_logprobs([PROMPTS[0]])[0]
    values, ids = expected.topk(5)
    vocab_bytes = token_bytes(white_box.tokenizer, white_box.vocab_size)
    for entry, v, i in zip(first.top_logprobs, values, ids, strict=True):
        assert bytes(entry.bytes) == vocab_bytes[int(i)]
        assert entry.logprob == pytest.approx(float(v), abs=1e-4)
    assert first.token == first.top_logprobs[0].token  # greedy
    assert r.usage.completion_tokens == len(r.choices[0].logprobs.content) <= 4

    done = c.completions.create(model=MODEL, prompt="hello", max_tokens=3, logprobs=2, seed=1)
    assert done.choices[0].logprobs.token_logprobs and done.usage.prompt_tokens > 0
    with pytest.raises(openai.BadRequestError, match="at most 5"):
        c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            logprobs=True,
            top_logprobs=6,
            max_tokens=1,
        )


@pytest.mark.parametrize("mode", ["after", "before"])
def test_logit_bias_in_both_modes(mode, after_server, before_server, white_box):
    url = after_server if mode == "after" else before_server
    expected = white_box.next_token_logprobs([PROMPTS[1]])[0]
    forced = int(expected.argsort()[len(expected) // 2])  # a mid-ranked token
    r = client(url).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": PROMPTS[1]}],
        logprobs=True,
        top_logprobs=1,
        max_tokens=1,
        temperature=0,
        logit_bias={str(forced): 100},
    )
    first = r.choices[0].logprobs.content[0]
    vocab_bytes = token_bytes(white_box.tokenizer, white_box.vocab_size)
    assert bytes(first.bytes) == vocab_bytes[forced]  # the bias made it the greedy choice
    if mode == "after":  # reported on the biased distribution: now nearly certain
        assert first.logprob > -1e-3
    else:  # reported on the unbiased distribution: its white-box value
        assert first.logprob == pytest.approx(float(expected[forced]), abs=1e-4)


def test_api_key_enforced(tiny_lm_dir):
    with running_server(tiny_lm_dir, "--api-key", "s3cret") as url:
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        assert http("GET", url + "/models")[0] == 401  # no key at all
        assert client(url, "s3cret").models.list().data[0].id == MODEL


def oversized(url: str) -> tuple[int, dict]:
    """Announce a 1 GB body and send none: the server must refuse before reading it."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000\r\n\r\n"
        )
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_bad_requests_get_4xx(after_server):
    def post(path, content=None, json=None):
        return http("POST", after_server + path, body=content, json_body=json)

    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    cases = [
        (post("/chat/completions", content=b"{not json"), 400),
        (post("/chat/completions", json={**chat, "model": "nope"}), 404),
        (post("/chat/completions", json={**chat, "temperature": 7}), 400),
        (post("/chat/completions", json={**chat, "temperature": 1e-300}), 200),
        (post("/chat/completions", json={**chat, "max_tokens": 10_000}), 400),
        (post("/chat/completions", json={**chat, "messages": []}), 400),
        (post("/chat/completions", json={**chat, "logit_bias": {"abc": 1}}), 400),
        # Digits int() takes but a token id is not written with: 400, not a crash.
        (post("/chat/completions", json={**chat, "logit_bias": {"\u00b2": 1}}), 400),
        (post("/chat/completions", json={**chat, "logit_bias": {"--5": 1}}), 400),
        (post("/chat/completions", json={**chat, "logit_bias": {"9" * 5000: 1}}), 400),
        (post("/chat/completions", json={**chat, "logit_bias": {"99999": 1}}), 400),
        (post("/chat/completions", json={**chat, "logit_bias": {"1": 500}}), 400),
        (
            post(
                "/chat/completions", json={**chat, "logit_bias": {str(i): 1 for i in range(2000)}}
            ),
            400,
        ),
        # What the server does not implement is refused unless it is a no-op.
        (post("/chat/completions", json={**chat, "top_p": 0.1}), 400),
        (post("/chat/completions", json={**chat, "top_p": 1, "stop": []}), 200),
        (post("/chat/completions", json={**chat, "stop": ["\n"]}), 400),
        (post("/chat/completions", json={**chat, "tools": [{"type": "function"}]}), 400),
        (post("/completions", json={"model": MODEL, "prompt": "hi", "best_of": 2}), 400),
        (post("/completions", json={"model": MODEL, "prompt": "word " * 400}), 400),
        (post("/completions", json={"model": MODEL, "prompt": ""}), 400),
        (oversized(after_server), 413),
    ]
    for (got, body), status in cases:
        assert got == status, body
        assert body["error"]["message"] if status >= 400 else body["choices"]


def test_completions_top_logprobs_keep_the_best_of_tokens_sharing_a_text():
    from types import SimpleNamespace

    from logit2prompt.server.app import _top_entries
    from logit2prompt.server.engine import Step

    # Ids 1 and 2 are halves of one UTF-8 character: both show as U+FFFD.
    engine = SimpleNamespace(bytes=[b"a", b"\xe2", b"\x82", b"b"])
    step = Step(token=2, logprob=-2.5, top=[(1, -0.5), (0, -1.0), (2, -2.5)])
    assert _top_entries(engine, step) == {"\ufffd": -0.5, "a": -1.0}
    assert list(_top_entries(engine, Step(3, -4.0, step.top))) == ["\ufffd", "a", "b"]


def test_sample_time_defenses_shape_what_the_server_samples(tiny_lm_dir):
    # topk:2 changes the service: hot sampling never leaves the 2 best tokens, each sampled
    # token is shown with its (renormalised) log-prob, never the floor of a hidden one.
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 1, "temperature": 2, "logprobs": 5}
    with running_server(tiny_lm_dir, "--max-top-logprobs", "5", "--defense", "topk:2") as url:
        shown = [
            http("POST", url + "/completions", json_body={**body, "seed": s})[1]["choices"][0]
            for s in range(24)
        ]
    assert all(c["logprobs"]["token_logprobs"][0] > -100 for c in shown)
    assert len({c["logprobs"]["tokens"][0] for c in shown}) == 2  # both, at temperature 2


def test_server_binds_loopback_by_default():
    from logit2prompt.cli.main import build_parser

    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1"


def test_fuzz_server_from_openapi_schema(white_box):
    """Whatever the schema lets a client send, the server never answers with a 5xx."""
    app = create_app(white_box, ServerConfig(model_name=MODEL, max_top_logprobs=5))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions"}
    for op in operations:

        @given(case=op.as_strategy())
        @settings(
            max_examples=50, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def check(case):
            response = case.call()
            assert response.status_code < 500, (case.body, response.text)

        check()


# ----------------------------------------------------------------------------- recovery
def test_parse_openai_spec():
    assert parse_openai_spec("openai:http://127.0.0.1:8000/v1:smol") == (
        "http://127.0.0.1:8000/v1",
        "smol",
    )
    assert parse_openai_spec("openai:https://api.x.com/v1:org/model-7b") == (
        "https://api.x.com/v1",
        "org/model-7b",
    )
    with pytest.raises(TargetError, match="openai:BASE_URL:MODEL"):
        parse_openai_spec("openai:nourl")


@pytest.mark.parametrize(
    ("server", "strategy", "top_k"),
    [("after_server", "bias-block", 5), ("before_server", "force", 5)],
)
def test_exact_recovery_through_http(server, strategy, top_k, white_box, tmp_path, request):
    url = request.getfixturevalue(server)
    target = api_target(url, white_box, tmp_path, concurrency=4)
    assert target.probe() == (strategy, top_k)
    got = target.next_token_logprobs(PROMPTS)
    expected = white_box.next_token_logprobs(PROMPTS)
    assert (got - expected).abs().max() <= 1e-3
    v = white_box.vocab_size
    per_prompt = {"bias-block": 1 + math.ceil((v - 1) / (top_k - 1)), "force": v}[strategy]
    assert target.query_cost(strategy, top_k) == per_prompt
    assert target.sent - target.probe_queries == len(PROMPTS) * per_prompt
    # What the endpoint reports directly, by token id, matches the recovered values.
    top = target.reported_top(PROMPTS[0], top_k)
    assert len(top) == top_k
    assert set(top) == set(expected[0].topk(top_k).indices.tolist())
    assert all(abs(float(got[0, t]) - lp) <= 1e-3 for t, lp in top.items())


def test_exact_recovery_through_legacy_completions(after_server, tiny_lm_dir, white_box, tmp_path):
    """Raw mode asks /completions, whose replies name tokens by their strings."""
    raw_box = HFTarget.from_pretrained(str(tiny_lm_dir), mode="raw")
    target = api_target(after_server, white_box, tmp_path, mode="raw", concurrency=4)
    assert target.probe() == ("bias-block", 5)
    # The first prompt's likeliest token is a partial UTF-8 byte, named U+FFFD like many;
    # every top entry of the second is: each is read against a named token, then normalised.
    assert target.reported_top(PROMPTS[1], 5) == {} != target.reported_top(PROMPTS[0], 5)
    got = target.next_token_logprobs(PROMPTS[:2])
    assert (got - raw_box.next_token_logprobs(PROMPTS[:2])).abs().max() <= 1e-3


def test_a_token_spelt_like_a_reply_marker_is_read_as_a_token(white_box):
    """Keys starting "t:" mark a reply that came back as text only; a legacy completion's
    token "t:A" must not read as the text "A"."""
    from copy import deepcopy

    from logit2prompt.targets.api.transport import RAW, TokenKeys

    tok = deepcopy(white_box.tokenizer)
    tok.add_tokens(["t:A"])
    marked = tok.convert_tokens_to_ids("t:A")
    keys = TokenKeys(tok, len(tok), "raw")
    assert keys.ids(RAW + "t:A") == [marked]
    assert marked not in keys.ids("t:A")


def test_gap_recovery_without_logprobs(blind_server, white_box, tmp_path):
    target = api_target(blind_server, white_box, tmp_path, bias=40.0, tolerance=0.02)
    assert target.probe()[0] == "gap"
    vec, report = target.recover(PROMPTS[0])
    expected = white_box.next_token_logprobs([PROMPTS[0]])[0]
    # Each gap is known to +-tolerance/2, and normalisation adds at most as much again.
    assert (vec - expected).abs().max() <= target.tolerance
    assert report.queries == target.query_cost("gap", 0) == 1 + (len(vec) - 1) * 11


def test_top1_after_bias_falls_back_to_gap(after_server, white_box, tmp_path):
    target = api_target(after_server, white_box, tmp_path, top_k=1)
    assert target.probe()[0] == "gap"
    # Forced, bias-block on top-1 would read nothing but bounds: refused.
    forced = api_target(after_server, white_box, tmp_path, top_k=1, strategy="bias-block")
    with pytest.raises(TargetError, match="at least 2 top log-probs"):
        forced.probe()


def test_probe_steps_down_to_the_endpoints_cap(tiny_lm_dir, white_box, tmp_path):
    with running_server(tiny_lm_dir, "--max-top-logprobs", "3") as url:
        # Auto: 20, 10, 5 and 4 are refused, 3 is the largest the endpoint shows.
        assert api_target(url, white_box, tmp_path).probe() == ("bias-block", 3)
        # Asked for by name, a refused count is an error quoting the endpoint.
        named = api_target(url, white_box, tmp_path, top_k=5)
        with pytest.raises(TargetError, match="refused top_logprobs=5"):
            named.probe()


def test_interrupted_recovery_resumes_without_asking_again(after_server, white_box, tmp_path):
    first = api_target(after_server, white_box, tmp_path, max_queries=40, concurrency=4)
    with pytest.raises(QueryBudgetExceeded, match="rerun"):
        first.next_token_logprobs(PROMPTS[:1])
    assert first.sent == 40
    kept = len(first.cache)
    assert kept == first.sent - first.refused  # every answer was kept
    second = api_target(after_server, white_box, tmp_path, concurrency=4)
    vec = second.next_token_logprobs(PROMPTS[:1])
    asked = (first.sent - first.probe_queries) + (second.sent - second.probe_queries)
    assert asked == second.query_cost("bias-block", 5)  # nothing answered was asked twice
    assert second.cache_hits == kept  # the probe's and the recovery's answers
    expected = white_box.next_token_logprobs(PROMPTS[:1])
    assert (vec - expected).abs().max() <= 1e-3


def test_a_cache_whose_endpoint_changed_is_refused(after_server, tiny_lm_dir, white_box, tmp_path):
    assert api_target(after_server, white_box, tmp_path).probe() == ("bias-block", 5)
    again = api_target(after_server, white_box, tmp_path)
    assert again.probe() == ("bias-block", 5) and again.probe_queries >= 1  # asked afresh
    # The same cache read for a server whose exposed values differ (a defense added on
    # restart): stale answers would be recovered as if current.
    changed = running_server(tiny_lm_dir, "--max-top-logprobs", "5", "--defense", "topk:3")
    with changed as url, pytest.raises(TargetError, match="answers otherwise.*--api-cache"):
        api_target(url, white_box, tmp_path).probe()


def test_collect_from_an_api_target(after_server, white_box, tmp_path):
    from logit2prompt.data.collect import collect
    from logit2prompt.data.corpus import Corpus, PromptRecord
    from logit2prompt.data.store import DistributionStore

    target = api_target(after_server, white_box, tmp_path)
    store_dir = tmp_path / "store"
    corpus = Corpus([PromptRecord(p) for p in PROMPTS], source="test")
    collect(target, corpus, str(store_dir), progress=False)
    store = DistributionStore(store_dir)
    assert store.fingerprint.name == f"openai:{after_server}:{MODEL}"
    expected = white_box.next_token_logprobs(store.prompts)
    got = torch.as_tensor(store.vectors(range(len(store))), dtype=torch.float32)[:, 0]
    assert sorted(store.prompts) == sorted(PROMPTS)
    assert (got - expected).abs().max() <= 2e-2  # the store keeps fp16
    report = store.manifest["collection"]
    assert report["queries_sent"] == target.sent > 0 and report["shards_written"] == 1
    # Rerun on the finished store: nothing is asked, and the report of how it was asked stays.
    collect(api_target(after_server, white_box, tmp_path), corpus, str(store_dir), progress=False)
    assert DistributionStore(store_dir).manifest["collection"] == report


def test_api_target_refuses_steps_and_empty_prompts(after_server, white_box, tmp_path):
    target = api_target(after_server, white_box, tmp_path)
    with pytest.raises(TargetError, match="steps=1"):
        target.next_token_logprobs(PROMPTS, steps=2)
    with pytest.raises(TargetError, match="empty"):
        target.recover("")


def test_unreachable_endpoint_is_a_clear_error(white_box, tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    target = OpenAITarget(
        url,
        MODEL,
        tokenizer=white_box.tokenizer,
        cache_path=tmp_path / "c.sqlite",
        max_retries=0,
        timeout=2,
    )
    with pytest.raises(TargetError, match="cannot reach|refused"):
        target.recover("hello")
    json.dumps(target.fingerprint.to_dict())  # the fingerprint serialises for stores


def test_collect_cli_through_an_api(after_server, tiny_lm_dir, corpus_file, tmp_path, capsys):
    from logit2prompt.cli.main import main
    from logit2prompt.data.store import DistributionStore

    out = tmp_path / "api-store"
    args = ["collect", "--target", f"openai:{after_server}:{MODEL}", "--tokenizer"]
    args += [str(tiny_lm_dir), "--prompts", str(corpus_file), "--limit", "3", "--out", str(out)]
    args += ["--api-cache", str(tmp_path / "cache.sqlite")]
    # A query budget stops the run with the reason; the rerun resumes from the cache.
    assert main([*args, "--no-progress", "--api-max-queries", "150"]) != 0
    assert "query budget of 150 reached" in capsys.readouterr().err
    assert main([*args, "--no-progress"]) == 0
    assert "strategy bias-block, top-5" in capsys.readouterr().err
    store = DistributionStore(out)
    assert len(store) == 3 and store.fingerprint.dtype == "api"
    # Under a defense: read from the same cache, recorded, with the API's query report.
    defended = [str(tmp_path / "defended") if a == str(out) else a for a in args]
    defended += ["--defense", "topk:5", "--no-progress"]
    assert main(defended) == 0
    manifest = read_manifest(tmp_path / "defended")
    assert manifest["fingerprint"]["defense"] == "topk:5"
    assert manifest["collection"]["cache_hits"] > 0
    vectors = DistributionStore(tmp_path / "defended").vectors(range(3))[:, 0]
    assert ((vectors > -100).sum(-1) == 5).all()


def test_api_target_refuses_settings_its_mode_ignores(white_box, tmp_path):
    with pytest.raises(TargetError, match="--user-turn is the attacker's.*in user mode"):
        api_target("http://127.0.0.1:9/v1", white_box, tmp_path, user_turn="Hi")
    with pytest.raises(TargetError, match="--system-prompt is user mode's.*in guarded mode"):
        api_target("http://127.0.0.1:9/v1", white_box, tmp_path, mode="guarded", system_prompt="x")
    with pytest.raises(TargetError, match="must not be empty"):
        api_target("http://127.0.0.1:9/v1", white_box, tmp_path, mode="system", user_turn=" ")


def test_rate_limiter_spaces_request_starts(monkeypatch):
    from logit2prompt.targets.api import transport

    clock = {"t": 100.0}
    monkeypatch.setattr(transport.time, "monotonic", lambda: clock["t"])
    monkeypatch.setattr(transport.time, "sleep", lambda s: clock.__setitem__("t", clock["t"] + s))
    limiter = transport.RateLimiter(4.0)  # 4 per second
    starts = []
    for _ in range(5):
        limiter.wait()
        starts.append(clock["t"])
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert all(g == pytest.approx(0.25) for g in gaps)


def test_retries_transient_server_errors(white_box, tmp_path):
    """A 503 then a 429 are retried with backoff by the official client; the answer is kept."""
    import http.server
    import threading

    failures = [503, 429]
    served = []

    class Flaky(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            served.append(self.path)
            if failures:
                code = failures.pop(0)
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(b'{"error": {"message": "busy"}}')
                return
            body = {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": MODEL,
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "length",
                        "message": {"role": "assistant", "content": "A"},
                        "logprobs": None,
                    }
                ],
            }
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        target = api_target(url, white_box, tmp_path, max_retries=3)
        request = target._request("hello", None, None, logprobs=False)
        reply = target._ask(request)
        assert reply.chosen == "t:A" and len(served) == 3  # two failures, then the answer
        assert target._ask(request) == reply and len(served) == 3  # from the cache
    finally:
        server.shutdown()


def test_blind_server_shows_no_logprobs_anywhere(blind_server):
    c = client(blind_server)
    with pytest.raises(openai.BadRequestError, match="not exposed"):
        c.completions.create(model=MODEL, prompt="hello", max_tokens=1, logprobs=0)
    with pytest.raises(openai.BadRequestError, match="not exposed"):
        c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], logprobs=True, max_tokens=1
        )
    r = c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, temperature=0
    )
    assert r.choices[0].logprobs is None and r.choices[0].message.content is not None


# ----------------------------------------------------------------------------- token subsets
@pytest.fixture(scope="module")
def noisy_server(tiny_lm_dir):
    args = ("--max-top-logprobs", "5", "--defense", "noise:gauss:0.05")
    with running_server(tiny_lm_dir, *args) as url:
        yield url


def _subset(white_box, size=52, seed=0):
    from logit2prompt.targets.subset import TokenSubset

    return TokenSubset.choose(white_box.tokenizer, white_box.vocab_size, size, seed)


@pytest.mark.parametrize(
    ("server", "strategy"), [("after_server", "bias-block"), ("before_server", "force")]
)
def test_subset_observations_through_http(server, strategy, white_box, tmp_path, request):
    url = request.getfixturevalue(server)
    target = api_target(url, white_box, tmp_path, concurrency=4)
    subset = _subset(white_box)
    assert target.probe() == (strategy, 5)
    before = target.sent
    got = target.observe_subset(PROMPTS, subset)
    expected = subset.observe(white_box.next_token_logprobs(PROMPTS)).numpy()
    assert got.shape == (len(PROMPTS), 1, subset.size)
    assert abs(got[:, 0] - expected).max() <= 1e-3
    # Only S is asked for: ~|S|/(k-1) queries with bias-block (+1 for the reference), |S|
    # with force; the full vector costs V/(k-1) or V.
    per_prompt = (target.sent - before) / len(PROMPTS)
    bound = {"bias-block": 1 + math.ceil(subset.size / 4), "force": subset.size}[strategy]
    assert per_prompt <= bound < target.query_cost(strategy, 5) / 5
    other = _subset(white_box, seed=1)
    foreign = type(other)(other.ids, other.vocab_size, "another-tokenizer", 1)
    with pytest.raises(TargetError, match="another tokenizer"):
        target.observe_subset(PROMPTS, foreign)


def test_full_vectors_from_a_subset_with_a_white_box_basis(after_server, white_box, tmp_path):
    target = api_target(after_server, white_box, tmp_path, concurrency=4)
    target.use_basis(white_box.output_basis(), _subset(white_box))
    before = target.sent
    got = target.next_token_logprobs(PROMPTS)
    expected = white_box.next_token_logprobs(PROMPTS)
    assert (got - expected).abs().max() <= 1e-3
    report = target.subset_report
    assert report["reconstructed"] == len(PROMPTS) and report["fallbacks"] == 0
    assert report["max_check_error"] <= 1e-3
    assert (target.sent - before) / len(PROMPTS) <= 1 + math.ceil((52 + 4) / 4)


def test_reconstruction_falls_back_when_the_check_fails(
    after_server, noisy_server, white_box, tmp_path, tiny_lm_dir
):
    from logit2prompt.targets.basis import OutputBasis

    # Another model's basis (same tokenizer): the check outside the subset fails, and the
    # exact strategy answers instead.
    wrong = white_box.output_basis()
    wrong = OutputBasis(wrong.weight + 0.05 * torch.randn_like(wrong.weight))
    target = api_target(after_server, white_box, tmp_path, concurrency=4)
    target.use_basis(wrong, _subset(white_box))
    got = target.next_token_logprobs(PROMPTS[:1])
    expected = white_box.next_token_logprobs(PROMPTS[:1])
    assert (got - expected).abs().max() <= 1e-3
    assert target.subset_report["fallbacks"] == 1 and target.subset_report["reconstructed"] == 0
    # A noisy endpoint fails it too: never a wrong distribution returned as if exact.
    noisy = api_target(noisy_server, white_box, tmp_path / "n", concurrency=4)
    noisy.use_basis(white_box.output_basis(), _subset(white_box))
    noisy.next_token_logprobs(PROMPTS[:1])
    assert noisy.subset_report["fallbacks"] == 1
    assert noisy.subset_report["max_check_error"] > 1e-3


def test_subset_store_through_the_api_feeds_a_white_box_trained_inverter(
    after_server, white_box, tiny_lm_dir, tmp_path, capsys
):
    from logit2prompt.attacks.invert import invert_store
    from logit2prompt.cli.main import main
    from logit2prompt.data.collect import collect
    from logit2prompt.data.corpus import Corpus, PromptRecord
    from logit2prompt.data.store import DistributionStore
    from logit2prompt.errors import StoreError
    from logit2prompt.models.inverter import Inverter
    from logit2prompt.training.trainer import Trainer

    from .conftest import FIXTURE_PROMPTS, tiny_train_config

    prompts = FIXTURE_PROMPTS[:8]
    corpus = Corpus([PromptRecord(p) for p in prompts], source="fixture")
    white = tmp_path / "white"
    collect(white_box, corpus, str(white), fmt="subset", subset_size=52, steps=1, progress=False)
    model_dir = tmp_path / "inv"
    cfg = tiny_train_config(white, model_dir, tiny_lm_dir, max_steps=300)
    Trainer(cfg).run()
    model = Inverter.from_pretrained(model_dir)
    corpus_file = tmp_path / "prompts.jsonl"
    corpus_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    out = tmp_path / "api-store"
    args = ["collect", "--target", f"openai:{after_server}:{MODEL}", "--tokenizer"]
    args += [str(tiny_lm_dir), "--prompts", str(corpus_file), "--out", str(out)]
    assert main([*args, "--format", "subset", "--subset-size", "52", "--no-progress"]) == 0
    api = DistributionStore(out)
    assert api.fingerprint.dtype == "api" and api.subset == model.token_subset
    collection = api.manifest["collection"]
    assert collection["strategy"] == "bias-block" and collection["queries_sent"] > 0
    white_store = DistributionStore(white)
    idx = [white_store.prompts.index(p) for p in api.prompts]
    assert abs(api.coordinates(range(len(api))) - white_store.coordinates(idx)).max() <= 1e-3
    assert invert_store(model, api, progress=False) == api.prompts
    # Full vectors of an API subset store need a basis: refused by name, then attached.
    with pytest.raises(StoreError, match="--basis-from"):
        api.vectors([0])
    api.attach(white_box.output_basis())
    full = white_box.next_token_logprobs(api.prompts[:2]).numpy()
    assert abs(api.vectors([0, 1])[:, 0] - full).max() <= 1e-3
    # The same prompts through invert --data, from the command line.
    assert (
        main(["invert", "--checkpoint", str(model_dir), "--data", str(out), "--no-progress"]) == 0
    )
    shown = capsys.readouterr().out
    assert all(p in shown for p in prompts)
    # A whole-vector inverter reads the same API store through a white-box basis.
    full_white = tmp_path / "white-full"
    collect(
        white_box,
        corpus,
        str(full_white),
        fmt="full",
        store_dtype="float32",
        steps=1,
        progress=False,
    )
    full_model = tmp_path / "inv-full"
    Trainer(tiny_train_config(full_white, full_model, tiny_lm_dir, max_steps=300)).run()
    invert = ["invert", "--checkpoint", str(full_model), "--data", str(out), "--no-progress"]
    assert main(invert) == 2
    assert "--basis-from" in capsys.readouterr().err
    assert main([*invert, "--basis-from", str(tiny_lm_dir)]) == 0
    shown = capsys.readouterr().out
    assert all(p in shown for p in prompts)


def test_probe_reads_the_hidden_size_from_api_answers(white_box, tmp_path, tiny_lm_dir):
    from logit2prompt.targets.api.probe import probe_endpoint

    with running_server(tiny_lm_dir, "--max-top-logprobs", "20") as url:
        target = api_target(url, white_box, tmp_path, concurrency=4)
        report = probe_endpoint(target, prompts=48, tokens=48, plot=tmp_path / "sv.png")
    assert report["hidden_size"]["estimate"] == 32  # the tiny model's hidden size
    assert report["exposes"]["top_k"] == 20 and report["strategy"] == "bias-block"
    costs = report["query_cost_per_step"]
    assert costs["subset_tokens"] == 132
    assert costs["bias-block"]["subset"] == 1 + math.ceil(131 / 19)
    assert costs["force"]["full"] == white_box.vocab_size
    assert (tmp_path / "sv.png").stat().st_size > 1000


def test_probe_finds_no_rank_behind_noise(noisy_server, white_box, tmp_path):
    from logit2prompt.targets.api.probe import probe_endpoint

    target = api_target(noisy_server, white_box, tmp_path, concurrency=4)
    report = probe_endpoint(target, prompts=48, tokens=48)
    assert report["hidden_size"]["estimate"] is None


def test_subset_observations_without_logprobs(blind_server, white_box, tmp_path):
    # "gap" reads logits relative to the top token; centring makes them the same observation.
    target = api_target(blind_server, white_box, tmp_path, bias=40.0, tolerance=0.02)
    subset = _subset(white_box, size=40)
    got = target.observe_subset(PROMPTS[:1], subset)[:, 0]
    expected = subset.observe(white_box.next_token_logprobs(PROMPTS[:1])).numpy()
    assert abs(got - expected).max() <= target.tolerance


def test_probe_api_cli(after_server, tiny_lm_dir, tmp_path, capsys):
    from logit2prompt.cli.main import main

    out = tmp_path / "probe.json"
    args = ["probe-api", "--target", f"openai:{after_server}:{MODEL}", "--tokenizer"]
    args += [str(tiny_lm_dir), "--probe-prompts", "48", "--probe-tokens", "48"]
    assert main([*args, "--json", str(out), "--plot", str(tmp_path / "p.png")]) == 0
    shown = capsys.readouterr().out
    assert "hidden size: 32" in shown and "top-5 log-probs, after logit_bias" in shown
    assert json.loads(out.read_text())["hidden_size"]["estimate"] == 32
    assert main(["probe-api", "--target", str(tiny_lm_dir)]) == 2
    assert "probe-api reads an endpoint" in capsys.readouterr().err


def test_collect_cli_rebuilds_full_vectors_from_a_subset(
    after_server, white_box, tiny_lm_dir, corpus_file, tmp_path, capsys
):
    from logit2prompt.cli.main import main
    from logit2prompt.data.store import DistributionStore

    out = tmp_path / "rebuilt"
    args = ["collect", "--target", f"openai:{after_server}:{MODEL}", "--tokenizer"]
    args += [str(tiny_lm_dir), "--prompts", str(corpus_file), "--limit", "3", "--out", str(out)]
    args += ["--basis-from", str(tiny_lm_dir), "--format", "full", "--store-dtype", "float32"]
    assert main([*args, "--no-progress"]) == 0
    # 32 + 100 subset tokens and 4 check tokens at top-5: 1 + 135 / 4, not 1 + 383 / 4 = 97.
    assert "35 queries per distribution" in capsys.readouterr().err
    store = DistributionStore(out)
    rebuilt = store.manifest["collection"]["subset_reconstruction"]
    assert rebuilt["reconstructed"] == 3 and rebuilt["fallbacks"] == 0
    expected = white_box.next_token_logprobs(store.prompts).numpy()
    assert abs(store.vectors(range(3))[:, 0] - expected).max() <= 1e-3


def test_serve_refuses_an_api_target(capsys):
    from logit2prompt.cli.main import main

    assert main(["serve", "--target", "openai:http://127.0.0.1:9/v1:m"]) == 2
    assert "serve runs a local model" in capsys.readouterr().err
