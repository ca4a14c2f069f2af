"""The LLM client over real HTTP against a fault-injecting OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import json
import time

import pytest

from pipeline.core.config import (
    REPO_ROOT,
    ClientConfig,
    ConfigError,
    ModelPreset,
    Price,
    load_preset,
)
from pipeline.engines.llm import (
    BudgetExhausted,
    EndpointRejected,
    Endpoints,
    LLMClient,
    LLMRequest,
    LLMSession,
    RequestCache,
    RequestsFailed,
    TokenBucket,
    length_retry,
    lookup,
    request_key,
)
from pipeline.engines.versions import engine_version
from tests.fakeserver import TRANSIENT_FAULTS, FakeOpenAIServer


def preset(url: str, **kw) -> ModelPreset:
    return ModelPreset(name="fake", engine="remote", model="m", base_url=url, **kw)


def reqs(n: int) -> list[LLMRequest]:
    return [LLMRequest(f"r{i}", messages=[{"role": "user", "content": f"exercise {i}"}],
                       params={"temperature": 0.5, "max_tokens": 64, "seed": i}) for i in range(n)]


async def run_all(client: LLMClient, requests: list[LLMRequest]):
    async with client:
        return await asyncio.gather(*(client.generate(r) for r in requests))


def test_every_fault_is_retried_to_the_clean_answer(tmp_path):
    # Up to two faults per request body, any two kinds: two retries of each class suffice.
    cfg = ClientConfig(concurrency=4, backoff_base_s=0.01, backoff_max_s=0.1, timeout_s=1.0, max_retries=4,
                       length_retries=2)
    with FakeOpenAIServer() as clean:
        expected = asyncio.run(run_all(LLMClient(preset(clean.base_url), [clean.base_url], cfg), reqs(24)))
    with FakeOpenAIServer(faults=TRANSIENT_FAULTS, faults_per_request=2, hang_s=2.5) as faulty:
        client = LLMClient(preset(faulty.base_url), [faulty.base_url], cfg)
        got = asyncio.run(run_all(client, reqs(24)))
        injected = dict(faulty.state.injected)
    assert [r.choices for r in got] == [r.choices for r in expected]
    assert all(r.ok for r in got)
    assert set(injected) == set(TRANSIENT_FAULTS), injected  # every fault kind really happened
    assert client.ledger.retries == sum(injected.values()) - injected["slow"]  # a slow answer needs no retry
    assert client.ledger.failed == 0


def test_retries_are_bounded_then_recorded_as_failed():
    cfg = ClientConfig(concurrency=2, backoff_base_s=0.01, backoff_max_s=0.05, max_retries=2)
    with FakeOpenAIServer(faults=("unavailable",), faults_per_request=99) as srv:
        srv._fault_for = lambda digest, attempt: "unavailable"  # every attempt fails
        client = LLMClient(preset(srv.base_url), [srv.base_url], cfg)
        got = asyncio.run(run_all(client, reqs(1)))
        assert srv.state.requests == 3  # 1 try + 2 retries, then stop
    assert [r.error for r in got] == ["server_error"]
    assert client.ledger.errors == {"server_error": 1}


def test_a_dead_endpoint_is_given_up_after_one_request_s_retries():
    # Every attempt fails. Once one request has used up its retries with nothing answered since it was
    # first sent, the endpoint is down: the requests waiting to be retried stop, the others are not sent.
    cfg = ClientConfig(concurrency=4, backoff_base_s=0.01, backoff_max_s=0.05, max_retries=3)
    with FakeOpenAIServer() as srv:
        srv._fault_for = lambda digest, attempt: "unavailable"
        client = LLMClient(preset(srv.base_url), [srv.base_url], cfg)
        got = asyncio.run(run_all(client, reqs(40)))
        sent = srv.state.requests
    errors = client.ledger.errors
    assert errors["server_error"] <= cfg.concurrency and errors["not_sent"] >= 40 - cfg.concurrency
    assert sum(errors.values()) == 40 and all(not r.ok for r in got)
    assert sent == client.ledger.requests_sent <= cfg.concurrency * (1 + cfg.max_retries)  # not 40 x 4


def test_requests_that_keep_failing_do_not_stop_the_others():
    # Two request bodies fail on every attempt while the rest are answered: no outage, each fails alone.
    cfg = ClientConfig(concurrency=4, backoff_base_s=0.01, backoff_max_s=0.05, max_retries=2)
    with FakeOpenAIServer(fail_first_bodies=2) as srv:
        client = LLMClient(preset(srv.base_url), [srv.base_url], cfg)
        got = asyncio.run(run_all(client, reqs(20)))
        assert len(srv.state.failing) == 2
    assert sorted(r.error or "ok" for r in got) == ["ok"] * 18 + ["server_error"] * 2
    assert client.ledger.errors == {"server_error": 2}


@pytest.mark.parametrize("fault, said", [
    ("key", "Incorrect API key provided"),
    (404, "does not exist"),
    (400, "maximum context length"),
])
def test_an_answer_no_retry_can_fix_stops_the_run_at_once(tmp_path, monkeypatch, fault, said):
    secret = "sk-test-0123456789abcdefSECRET"
    monkeypatch.setenv("FAKE_TEST_KEY", secret)
    cfg = ClientConfig(concurrency=2, backoff_base_s=0.01, max_retries=5)
    state = {"api_key": "sk-the-right-one-0000000000"} if fault == "key" else {
        "status": fault, "status_message": f"The server says: {said} ({secret} echoed)"}
    with FakeOpenAIServer(**state) as srv:
        p = preset(srv.base_url, api_key_env="FAKE_TEST_KEY")
        cache = RequestCache(tmp_path / "c.sqlite")
        with LLMSession(p, cfg, cache, urls=[srv.base_url]) as session, pytest.raises(EndpointRejected) as err:
            session.complete(reqs(20))
        assert srv.state.requests <= cfg.concurrency  # no retry, and nothing sent after the first answer
    message = str(err.value)
    status = 401 if fault == "key" else fault
    assert f"preset 'fake' at {srv.base_url} answered HTTP {status}" in message and said in message
    assert "stopped without retrying" in message and secret not in message and "\n" not in message
    if fault == "key":
        assert "FAKE_TEST_KEY" in message  # where the key comes from, never the key


def test_unreachable_endpoint_fails_with_connection_error():
    cfg = ClientConfig(max_retries=1, backoff_base_s=0.01, timeout_s=2)
    url = "http://127.0.0.1:9/v1"  # discard port: nothing listens
    got = asyncio.run(run_all(LLMClient(preset(url), [url], cfg), reqs(2)))
    assert [r.error for r in got] == ["connection", "connection"]


def test_cache_answers_without_sending_and_survives_reopen(tmp_path):
    cfg = ClientConfig(concurrency=4)
    with FakeOpenAIServer() as srv:
        cache = RequestCache(tmp_path / "c.sqlite")
        first = asyncio.run(run_all(LLMClient(preset(srv.base_url), [srv.base_url], cfg, cache=cache), reqs(10)))
        cache.close()
        sent = srv.state.requests
        cache = RequestCache(tmp_path / "c.sqlite")
        client = LLMClient(preset(srv.base_url), [srv.base_url], cfg, cache=cache)
        second = asyncio.run(run_all(client, reqs(10)))
        assert srv.state.requests == sent  # nothing sent the second time
    assert [r.choices for r in second] == [r.choices for r in first]
    assert all(r.cached for r in second) and client.ledger.cache_hits == 10


def test_cache_key_covers_every_sampling_parameter():
    base = request_key("m", "chat", [{"role": "user", "content": "x"}], None, {"temperature": 0.5, "seed": 1})
    assert base != request_key("m", "chat", [{"role": "user", "content": "x"}], None, {"temperature": 0.6, "seed": 1})
    assert base != request_key("m", "chat", [{"role": "user", "content": "x"}], None, {"temperature": 0.5, "seed": 2})
    assert base != request_key("m2", "chat", [{"role": "user", "content": "x"}], None, {"temperature": 0.5, "seed": 1})
    assert base == request_key("m", "chat", [{"role": "user", "content": "x"}], None, {"seed": 1, "temperature": 0.5})


def test_usage_and_cost_are_accounted():
    cfg = ClientConfig()
    with FakeOpenAIServer() as srv:
        p = preset(srv.base_url, price=Price(prompt_per_mtok=1e6, completion_per_mtok=2e6))
        client = LLMClient(p, [srv.base_url], cfg)
        got = asyncio.run(run_all(client, reqs(3)))
    for r in got:
        assert r.cost_usd == r.usage["prompt_tokens"] * 1 + r.usage["completion_tokens"] * 2 > 0
    assert client.ledger.cost_usd_this_run == pytest.approx(sum(r.cost_usd for r in got))


def test_requests_are_spread_over_replicas():
    cfg = ClientConfig(concurrency=4)
    with FakeOpenAIServer(latency_s=0.05) as a, FakeOpenAIServer(latency_s=0.05) as b:
        asyncio.run(run_all(LLMClient(preset(a.base_url), [a.base_url, b.base_url], cfg), reqs(20)))
        assert a.state.requests >= 5 and b.state.requests >= 5
        assert a.state.requests + b.state.requests == 20


def test_a_dead_replica_is_left_out_and_its_requests_go_at_once_to_a_live_one():
    # The first endpoint refuses connections. A long backoff and one retry: only an immediate failover
    # to the live replica finishes every request, and fast.
    cfg = ClientConfig(concurrency=4, max_retries=1, backoff_base_s=30, backoff_max_s=30, endpoint_cooldown_s=60)
    dead = "http://127.0.0.1:9/v1"
    with FakeOpenAIServer() as live:
        p = ModelPreset(name="fleet", engine="remote", model="m", base_urls=[dead, live.base_url], hf_id="org/m")
        client = LLMClient(p, p.base_urls, cfg)
        got = asyncio.run(run_all(client, reqs(20)))
        assert live.state.requests == 20
        with FakeOpenAIServer() as alone:  # the same requests to one clean endpoint
            expected = asyncio.run(run_all(LLMClient(preset(alone.base_url), [alone.base_url], cfg), reqs(20)))
    assert all(r.ok for r in got) and [r.choices for r in got] == [r.choices for r in expected]
    led = client.ledger
    # Only the requests picked before the first refusal came back went to the dead one (at most one per slot).
    assert 1 <= led.by_endpoint[0]["sent"] <= cfg.concurrency
    assert led.by_endpoint[0]["failed"] == led.by_endpoint[0]["sent"] == led.failovers == led.retries
    assert led.by_endpoint[1] == {"sent": 20, "failed": 0} and led.failed == 0
    assert led.requests_sent == 20 + led.retries  # nothing that succeeded was sent again
    assert led.backoff_s == 0  # every retry went at once to the live replica: none waited out the 30 s backoff


def test_an_endpoint_is_tried_again_after_its_cooldown_and_the_soonest_back_when_all_are_down():
    ends = Endpoints(3, cooldown_s=0.2)
    ends.inflight[:] = [2, 0, 1]
    assert ends.pick() == 1  # the fewest in flight
    ends.failed(1)
    assert ends.pick() == 2 and ends.live() == [0, 2]
    ends.failed(0)
    ends.failed(0)  # a second failure in a row: twice the cooldown
    ends.failed(2)
    assert ends.live() == [] and ends.pick() == 1  # all down: the one back soonest (failed first, once)
    time.sleep(0.25)
    assert ends.live() == [1, 2] and ends.pick() == 1
    ends.succeeded(0)
    assert ends.live() == [0, 1, 2] and ends.counts[0] == {"sent": 0, "failed": 2}


def test_several_endpoints_share_one_cache_identity_whatever_their_urls():
    fleet = ModelPreset(name="f", engine="remote", model="m", base_urls=["http://a:1/v1", "http://b:1/v1"],
                        hf_id="org/m")
    moved = dataclasses.replace(fleet, base_urls=["http://c:1/v1"])
    assert fleet.identity() == moved.identity()
    assert fleet.identity() != dataclasses.replace(fleet, hf_id="org/other").identity()
    with pytest.raises(ConfigError, match="base_urls.*need hf_id"):
        ModelPreset(name="f", engine="remote", model="m", base_urls=["http://a:1/v1", "http://b:1/v1"])
    with pytest.raises(ConfigError, match="base_url or base_urls"):
        ModelPreset(name="f", engine="remote", model="m", base_url="http://a:1/v1", base_urls=["http://b:1/v1"],
                    hf_id="org/m")
    with pytest.raises(ConfigError, match="lists an endpoint twice"):
        ModelPreset(name="f", engine="remote", model="m", base_urls=["http://a:1/v1"] * 2, hf_id="org/m")
    with pytest.raises(ConfigError, match="base_urls.*is for engine 'remote'"):
        ModelPreset(name="f", engine="vllm", model="m", hf_id="org/m", base_urls=["http://a:1/v1"])


def test_token_bucket_limits_request_rate():
    cfg = ClientConfig(concurrency=8, requests_per_minute=600)  # 10/s, 1 s burst
    with FakeOpenAIServer() as srv:
        t0 = time.monotonic()
        asyncio.run(run_all(LLMClient(preset(srv.base_url), [srv.base_url], cfg), reqs(20)))
        elapsed = time.monotonic() - t0
    assert elapsed >= 0.85  # 10 in the burst, then 10 more at 10/s


def test_token_bucket_debt_for_large_takes():
    async def go():
        bucket = TokenBucket(per_minute=60 * 100)  # 100 tokens/s, capacity 100
        t0 = time.monotonic()
        await bucket.take(300)  # larger than capacity: allowed, runs into debt
        await bucket.take(100)  # must wait ~3 s for the debt + this take
        return time.monotonic() - t0
    assert asyncio.run(go()) >= 2.5


def test_missing_api_key_fails_before_any_request(monkeypatch):
    monkeypatch.delenv("TEXTBOOK_TEST_KEY", raising=False)
    p = ModelPreset(name="r", engine="remote", model="m", base_url="http://127.0.0.1:9/v1",
                    api_key_env="TEXTBOOK_TEST_KEY")
    with pytest.raises(ConfigError, match="TEXTBOOK_TEST_KEY"):
        LLMClient(p, [p.base_url], ClientConfig())


# ---------------------------------------------------------------------------------------
# The cache key holds everything that can change a completion, and nothing that cannot
# ---------------------------------------------------------------------------------------

REQUEST = LLMRequest("r", messages=[{"role": "user", "content": "write add(a, b)"}],
                     params={"temperature": 0.8, "top_p": 0.95, "max_tokens": 64, "seed": 7})


def _variant(preset_: ModelPreset, server: dict | None = None, **top) -> ModelPreset:
    return dataclasses.replace(preset_, server=dataclasses.replace(preset_.server, **(server or {})), **top)


def _hits(tmp_path, stored: ModelPreset, asked: ModelPreset, req: LLMRequest = REQUEST) -> bool:
    """Whether `asked` gets the completion that `stored` put in a real request cache."""
    cache = RequestCache(tmp_path / f"{len(list(tmp_path.iterdir()))}.sqlite")
    try:
        cache.put(request_key(stored.identity(), stored.api, REQUEST.messages, REQUEST.prompt, REQUEST.params),
                  stored.identity(), {"choices": [{"text": "x", "finish_reason": "stop"}], "usage": {}, "cost_usd": 0})
        return lookup(cache, asked, req) is not None
    finally:
        cache.close()


@pytest.fixture(scope="module")
def teacher() -> ModelPreset:
    """The teacher on llama-cpp-python (one request at a time, each from an empty context)."""
    batched = load_preset("qwen2.5-coder-0.5b-instruct", REPO_ROOT / "configs")
    return dataclasses.replace(batched, server=dataclasses.replace(
        batched.server, program="llama-cpp-python", n_parallel=2, reuse_prompt_prefix=False))


def test_on_llama_server_the_program_and_slot_count_are_in_the_key(tmp_path, teacher):
    batched = load_preset("qwen2.5-coder-0.5b-instruct", REPO_ROOT / "configs")  # as shipped: llama-server
    assert batched.server.program == "llama-server" and "llama-server==" in batched.identity()
    assert not _hits(tmp_path, teacher, batched)  # another program
    more_slots = dataclasses.replace(batched, server=dataclasses.replace(batched.server, n_parallel=16))
    assert not _hits(tmp_path, batched, more_slots)  # the batch's size changes its numerics
    fewer_threads = dataclasses.replace(batched, server=dataclasses.replace(batched.server, n_threads=1))
    assert _hits(tmp_path, batched, fewer_threads)


@pytest.mark.parametrize("change", [
    {"server": {"n_batch": 256}},
    {"server": {"n_ctx": 8192}},
    {"server": {"reuse_prompt_prefix": True}},
    {"server": {"extra_args": ["--rope_freq_base", "20000"]}},
    {"chat_format": "chatml"},
    {"api": "completions"},
    {"model": "another-alias"},
    {"gguf_sha256": "0" * 64},
])
def test_a_setting_that_changes_completions_misses_the_cache(tmp_path, teacher, change):
    change = dict(change)
    if "gguf_sha256" in change:
        change["gguf"] = dataclasses.replace(teacher.gguf, sha256=change.pop("gguf_sha256"))
    assert _hits(tmp_path, teacher, teacher)
    assert not _hits(tmp_path, teacher, _variant(teacher, **change))


def test_the_engine_version_is_in_the_key(tmp_path, teacher, monkeypatch, request):
    cache = RequestCache(tmp_path / "c.sqlite")
    cache.put(request_key(teacher.identity(), teacher.api, REQUEST.messages, None, REQUEST.params),
              teacher.identity(), {"choices": [{"text": "x", "finish_reason": "stop"}], "usage": {}, "cost_usd": 0})
    assert lookup(cache, teacher, REQUEST) is not None
    real = importlib.metadata.version  # a llama-cpp-python upgrade, as pip would install it
    monkeypatch.setattr(importlib.metadata, "version", lambda d: "9.9.9" if d == "llama-cpp-python" else real(d))
    engine_version.cache_clear()
    request.addfinalizer(engine_version.cache_clear)
    assert "llama-cpp-python==9.9.9" in teacher.identity()
    assert lookup(cache, teacher, REQUEST) is None
    cache.close()


@pytest.mark.parametrize("params", [
    {"temperature": 0.7}, {"top_p": 0.9}, {"max_tokens": 65}, {"seed": 8}, {"stop": ["\n"]}, {"n": 2},
])
def test_a_sampling_change_misses_the_cache(tmp_path, teacher, params):
    req = dataclasses.replace(REQUEST, params={**REQUEST.params, **params})
    assert not _hits(tmp_path, teacher, teacher, req)


def test_a_prompt_change_misses_the_cache(tmp_path, teacher):
    other = dataclasses.replace(REQUEST, messages=[{"role": "user", "content": "write add(a, b) "}])
    assert not _hits(tmp_path, teacher, teacher, other)
    as_prompt = dataclasses.replace(REQUEST, messages=None, prompt=REQUEST.messages[0]["content"])
    assert not _hits(tmp_path, teacher, teacher, as_prompt)


@pytest.mark.parametrize("server", [
    {"n_parallel": 7}, {"n_threads": 1}, {"startup_timeout_s": 5.0},
])
def test_what_cannot_change_a_completion_still_hits(tmp_path, teacher, server):
    # Worker count, threads and timeouts: 1 process x 2 threads gave the same tokens as 2 x 1.
    # Ports and log paths are not settings of the preset at all: a served model's url never enters the key.
    assert _hits(tmp_path, teacher, _variant(teacher, server=server))


def test_a_remote_endpoint_key_ignores_its_url_only_for_managed_servers(tmp_path):
    a = preset("http://127.0.0.1:1111/v1")
    assert _hits(tmp_path, a, a)
    assert not _hits(tmp_path, a, preset("http://api.example.invalid/v1"))  # another remote endpoint


# ---------------------------------------------------------------------------------------
# Answers cut at max_tokens, and the budget with requests in flight
# ---------------------------------------------------------------------------------------


def _cut_every_other_request(srv: FakeOpenAIServer) -> None:
    """The 1st, 3rd, ... request the server sees is cut at max_tokens (one request in flight at a time)."""
    seen = []
    srv._fault_for = lambda digest, attempt: seen.append(digest) or ("length" if len(seen) % 2 else None)


def test_a_cut_sampled_answer_is_asked_again_with_another_seed_and_both_are_paid(tmp_path):
    cfg = ClientConfig(concurrency=1, length_retries=1)
    price = Price(prompt_per_mtok=1e6, completion_per_mtok=1e6)  # $1 a token: the ledger counts every one
    with FakeOpenAIServer() as srv:
        _cut_every_other_request(srv)
        client = LLMClient(preset(srv.base_url, price=price), [srv.base_url], cfg, cache=RequestCache(tmp_path / "c"))
        got = asyncio.run(run_all(client, reqs(3)))
        assert srv.state.requests == 6  # each request: one cut answer, one full answer
        bodies = list(srv.state.attempts)  # request bodies by digest: 6 different ones, reseeded retries
        assert len(bodies) == 6
    assert all(r.ok and r.choices[0]["finish_reason"] == "stop" for r in got)
    led = client.ledger
    assert led.length_retries == 3 and led.requests_sent == 6
    paid = led.prompt_tokens + led.completion_tokens
    assert led.cost_usd_this_run == pytest.approx(paid) and paid > sum(sum(r.usage.values()) for r in got)
    # The full answer is cached under the original request: a re-run asks nothing (the server is gone) and gets it.
    again = LLMClient(preset(srv.base_url, price=price), [srv.base_url], cfg, cache=RequestCache(tmp_path / "c"))
    assert [r.choices for r in asyncio.run(run_all(again, reqs(3)))] == [r.choices for r in got]


def test_a_cut_greedy_answer_is_not_asked_again():
    # Greedy decoding returns the same truncation: a retry would be paid for nothing.
    cfg = ClientConfig(concurrency=1, length_retries=3)
    greedy = [LLMRequest(r.id, messages=r.messages, params={**r.params, "temperature": 0.0}) for r in reqs(2)]
    with FakeOpenAIServer(faults=("length",), faults_per_request=99) as srv:
        srv._fault_for = lambda digest, attempt: "length"
        client = LLMClient(preset(srv.base_url), [srv.base_url], cfg)
        got = asyncio.run(run_all(client, greedy))
        assert srv.state.requests == 2
    assert [r.choices[0]["finish_reason"] for r in got] == ["length", "length"]
    assert client.ledger.length_retries == 0 and client.ledger.retries == 0


def test_length_retry_changes_the_seed_only_when_sampling():
    sampled = LLMRequest("a", prompt="p", params={"temperature": 0.8, "seed": 5})
    first, second = length_retry(sampled, 1), length_retry(sampled, 2)
    assert first.params["seed"] != 5 and second.params["seed"] not in (5, first.params["seed"])
    assert length_retry(sampled, 1) == first  # derived, so a cold re-run asks the same questions
    assert length_retry(LLMRequest("b", prompt="p", params={"temperature": 0, "seed": 5}), 1) is None


def test_the_budget_holds_with_many_requests_in_flight():
    # A request may cost up to (prompt estimate + 2,048 max_tokens) x $1e-4; its real answer costs
    # far less. 8 in flight at once: the old check (before the gate, ignoring requests in flight)
    # let all 8 through at a budget that fits 2 worst cases.
    price = Price(prompt_per_mtok=100, completion_per_mtok=100)
    budget = 0.5
    cfg = ClientConfig(concurrency=8, budget_usd=budget, length_retries=0)  # one paid attempt per request
    requests = [LLMRequest(r.id, messages=r.messages, params={**r.params, "max_tokens": 2048}) for r in reqs(60)]
    with FakeOpenAIServer(latency_s=0.02) as srv:
        client = LLMClient(preset(srv.base_url, price=price), [srv.base_url], cfg)

        async def go():
            async with client:
                return await asyncio.gather(*(client.generate(r) for r in requests), return_exceptions=True)

        got = asyncio.run(go())
    done = [r for r in got if not isinstance(r, BaseException)]
    stopped = [r for r in got if isinstance(r, BudgetExhausted)]
    assert len(done) + len(stopped) == 60 and stopped  # the budget ran out: the rest were never sent
    assert len(done) > 2  # requests waited for the ones in flight to settle instead of stopping early
    assert client.ledger.requests_sent == len(done)
    assert client.ledger.cost_usd_this_run <= budget
    assert budget - client.ledger.cost_usd_this_run < 2048e-4 + 0.01  # it stopped when a worst case no longer fit


# ---------------------------------------------------------------------------------------
# The OpenAI Batch API, against the fake batch service
# ---------------------------------------------------------------------------------------

BATCH = ClientConfig(batch=True, batch_poll_s=0.01, max_retries=1, concurrency=4)


def batch_preset(url: str, **kw) -> ModelPreset:
    return preset(url, batch_api=True, price=Price(prompt_per_mtok=1e6, completion_per_mtok=2e6), **kw)


def complete(p: ModelPreset, cfg: ClientConfig, cache: RequestCache, requests: list[LLMRequest]):
    with LLMSession(p, cfg, cache, urls=[p.base_url]) as session:
        return session, session.complete(requests)


def test_batch_answers_are_the_online_answers_at_half_the_price_under_the_same_cache_keys(tmp_path):
    with FakeOpenAIServer() as srv:
        p = batch_preset(srv.base_url)
        online, got_online = complete(p, dataclasses.replace(BATCH, batch=False), RequestCache(tmp_path / "o"),
                                      reqs(10))
        cache = RequestCache(tmp_path / "b")
        batch, got_batch = complete(p, BATCH, cache, reqs(10))
        st = srv.state
        assert st.uploads == st.batches_created == 1 and st.batch_items == 10
        lines = [json.loads(x) for x in st.files["file-0001"].decode().splitlines()]
    assert [got_batch.results[r.id].choices for r in reqs(10)] == [got_online.results[r.id].choices for r in reqs(10)]
    # custom_id = the request's cache key, and the answer is cached under it
    assert sorted(x["custom_id"] for x in lines) == sorted(r.key for r in got_online.results.values())
    assert all(cache.get(x["custom_id"]) is not None for x in lines)
    assert {x["url"] for x in lines} == {"/v1/chat/completions"} and lines[0]["body"]["model"] == "m"
    assert batch.ledger.cost_usd_this_run == pytest.approx(online.ledger.cost_usd_this_run / 2)  # the batch price
    assert batch.ledger.batches_submitted == 1 and batch.ledger.requests_sent == 10
    # An online session from the batch's cache sends nothing.
    again, got_again = complete(p, dataclasses.replace(BATCH, batch=False), cache, reqs(10))
    assert not again.sent and {k: v.choices for k, v in got_again.results.items()} == {
        k: v.choices for k, v in got_batch.results.items()}


def test_batch_files_hold_at_most_batch_max_requests(tmp_path):
    with FakeOpenAIServer() as srv:
        _, got = complete(batch_preset(srv.base_url), dataclasses.replace(BATCH, batch_max_requests=4),
                          RequestCache(tmp_path / "c"), reqs(10))
        assert srv.state.batches_created == 3 and srv.state.batch_items == 10
    assert len(got.results) == 10


def test_an_expired_batch_and_failed_items_are_submitted_once_more(tmp_path):
    with FakeOpenAIServer(batch_expire=1, batch_item_failures=1) as srv:
        session, got = complete(batch_preset(srv.base_url), BATCH, RequestCache(tmp_path / "c"), reqs(12))
        st = srv.state
        assert st.batches_created == 2 and st.batch_items == 24  # every item failed or expired once
        first = st.batches["batch_0001"]
        errors = [json.loads(x) for x in st.files[first["error_file_id"]].decode().splitlines()]
        kinds = {(x["error"] or {}).get("code") or x["response"]["status_code"] for x in errors}
        assert first["status"] == "expired" and kinds == {"batch_expired", 500} and len(errors) == 12
    assert len(got.results) == 12 and not got.failed and not session.failed


def test_batch_items_that_fail_twice_are_handed_back_and_a_rerun_sends_only_them(tmp_path):
    cache = RequestCache(tmp_path / "c")
    with FakeOpenAIServer(batch_item_failures=2) as srv:
        p = batch_preset(srv.base_url)
        session, got = complete(p, BATCH, cache, reqs(6))
        assert {r.error for r in got.failed.values()} == {"server_error"} and len(got.failed) == 6
        with pytest.raises(RequestsFailed, match=r"6 request\(s\) failed at preset 'fake' \(Batch API at .*\) "
                                                 r"\(server_error: 6\); 0 answered and cached; run again: only the 6"):
            session.raise_if_failed(lost=6, total=6)
        srv.state.batch_item_failures = 0
        _, got = complete(p, BATCH, cache, reqs(8))  # two more: only the 6 failed + 2 new are submitted
        assert srv.state.batch_items == 12 + 8 and len(got.results) == 8


@pytest.mark.parametrize("fault", ["item_400", "refused"])
def test_a_batch_answer_no_retry_can_fix_stops_the_run(tmp_path, fault):
    state = {"batch_status": 400, "status_message": "Invalid value for 'max_tokens'"} if fault == "item_400" else {
        "batch_refuse": True}
    with FakeOpenAIServer(**state) as srv:
        with pytest.raises(EndpointRejected) as err:
            complete(batch_preset(srv.base_url), BATCH, RequestCache(tmp_path / "c"), reqs(3))
        assert srv.state.batches_created == 1  # not submitted again
    message = str(err.value)
    assert f"preset 'fake' at {srv.base_url}" in message and "stopped without retrying" in message
    assert ("Invalid value for 'max_tokens'" if fault == "item_400" else "does not exist") in message


def test_a_cut_sampled_batch_answer_is_asked_again_with_another_seed_in_the_next_batch(tmp_path):
    cfg = dataclasses.replace(BATCH, length_retries=1)
    cache = RequestCache(tmp_path / "c")
    with FakeOpenAIServer(batch_cut_first=2) as srv:
        session, got = complete(batch_preset(srv.base_url), cfg, cache, reqs(4))
        st = srv.state
        assert st.batches_created == 2 and st.batch_items == 4 + 2
        second = [json.loads(x) for x in st.files[st.batches["batch_0002"]["input_file_id"]].decode().splitlines()]
    originals = {r.key for r in got.results.values()}
    assert {x["custom_id"] for x in second}.isdisjoint(originals)  # the reseeded requests: other keys, other seeds
    assert all(r.choices[0]["finish_reason"] == "stop" for r in got.results.values())  # cached under the originals
    led = session.ledger
    assert led.length_retries == 2 and led.prompt_tokens > sum(r.usage["prompt_tokens"] for r in got.results.values())


def test_the_budget_counts_a_batch_at_its_worst_case_before_submitting_it(tmp_path):
    # Worst case of one request at the batch price: (prompt ~8 tokens x $0.5 + 64 max_tokens x $1) x 2 paid
    # attempts (temperature 0.5, one length retry) ~ $136; a $500 budget fits 3 of them, whatever they then cost.
    cfg = dataclasses.replace(BATCH, budget_usd=500.0)
    with FakeOpenAIServer() as srv:
        session, got = complete(batch_preset(srv.base_url), cfg, RequestCache(tmp_path / "c"), reqs(10))
        assert srv.state.batch_items == 3
    assert len(got.results) == 3 and got.budget_hit and got.not_attempted == [f"r{i}" for i in range(3, 10)]
    assert session.ledger.cost_usd_this_run <= 500.0


def test_a_kill_after_the_batch_is_created_but_before_its_id_is_saved_finds_the_batch_again(tmp_path, monkeypatch):
    from pipeline.engines import batch as batch_mod

    real = batch_mod.SubmissionStore.update

    def killed_before_saving_the_batch_id(self, sub, closed=False):
        if sub.batch_id is not None and not sub.status.startswith("in_"):
            raise KeyboardInterrupt  # the process dies between batches.create and the save
        return real(self, sub, closed)

    cache = RequestCache(tmp_path / "c")
    with FakeOpenAIServer(batch_item_failures=1) as srv:  # and every item of that batch fails once
        p = batch_preset(srv.base_url)
        monkeypatch.setattr(batch_mod.SubmissionStore, "update", killed_before_saving_the_batch_id)
        with pytest.raises(KeyboardInterrupt):
            complete(p, BATCH, cache, reqs(5))
        monkeypatch.setattr(batch_mod.SubmissionStore, "update", real)
        assert srv.state.batches_created == 1 and len(cache) == 0
        session, got = complete(p, BATCH, cache, reqs(5))
        # Found by its metadata, not created again; its failed items went once more in a second batch.
        assert srv.state.batches_created == 2 and srv.state.batch_items == 10 and srv.state.uploads == 2
        assert [b["metadata"]["textbook_submission"] for b in srv.state.batches.values()][0] in {
            row[0] for row in cache.db.execute("SELECT id FROM batch_submissions")}
    assert len(got.results) == 5 and session.ledger.batches_resumed == 1 and session.ledger.batches_submitted == 1


def test_batch_needs_a_preset_that_offers_it(tmp_path):
    with pytest.raises(ConfigError, match="client.batch: preset 'fake' does not offer the Batch API"):
        LLMSession(preset("http://127.0.0.1:9/v1"), BATCH, RequestCache(tmp_path / "c"))
    shipped = load_preset("gpt-4o-mini", REPO_ROOT / "configs")
    assert shipped.batch_api and shipped.price.cost(1_000_000, 1_000_000, batch=True) == pytest.approx(0.375)
