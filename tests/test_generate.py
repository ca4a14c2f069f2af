"""The generate stage against real local HTTP servers: faults, kill -9, cache, budget, bad input."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main as cli_main
from pipeline.core.config import ConfigError, load_config
from pipeline.engines.llm import RequestsFailed
from pipeline.stages.generate import (
    ParseError,
    load_prompt_space,
    parse_exercise,
    parse_textbook,
    run_generate,
    sample_specs,
)
from tests.fakeserver import TRANSIENT_FAULTS, FakeOpenAIServer

from .conftest import REPO, add_preset, fake_params, make_project

OUTPUTS = ("exercises.jsonl", "textbooks.jsonl", "rejected.jsonl", "coverage.json")


def run(project: Path, *overrides: str) -> dict:
    return run_generate(load_config(project / "params.yaml", list(overrides)), project / "params.yaml", progress=False)


def outputs(project: Path, out: str = "data/generate") -> dict[str, bytes]:
    return {name: (project / out / name).read_bytes() for name in OUTPUTS}


def use_server(project: Path, url: str, **preset) -> None:
    add_preset(project, "fake", engine="remote", model="fake-model", api="chat", base_url=url, **preset)


def test_clean_run_writes_parsed_records_sorted_by_id(fake_project, fake_server):
    stats = run(fake_project)
    ex = [json.loads(x) for x in (fake_project / "data/generate/exercises.jsonl").read_text().splitlines()]
    tb = [json.loads(x) for x in (fake_project / "data/generate/textbooks.jsonl").read_text().splitlines()]
    assert stats["kept"] == {"exercise": 12, "textbook": 3} and stats["rejected"] == 0
    assert [r["id"] for r in ex] == sorted(r["id"] for r in ex)
    rec = ex[0]
    for key in ("id", "kind", "attributes", "prompt_hash", "model", "sampling", "raw", "parsed", "usage", "finish_reason"):
        assert key in rec, key
    assert rec["parsed"]["function_name"] in rec["parsed"]["prompt"]
    assert "assert" in rec["parsed"]["tests"] and rec["parsed"]["solution"].strip().startswith("return")
    assert tb[0]["parsed"]["code_blocks"]
    cov = json.loads((fake_project / "data/generate/coverage.json").read_text())
    assert cov["duplicate_prompt_rate"] == 0 and cov["distinct_function_names"] == 12
    resolved = yaml.safe_load((fake_project / "data/generate/resolved_config.yaml").read_text())
    assert resolved["generate"]["teacher"] == "fake" and resolved["presets"]["fake"]["base_url"] == fake_server.base_url


def test_faulty_server_ends_with_the_clean_dataset(fake_project, fake_server, tmp_path):
    run(fake_project)
    clean = outputs(fake_project)
    fake_server.stop()  # the same endpoint (URL, model) comes back, now faulty
    with FakeOpenAIServer(port=fake_server.port, faults=TRANSIENT_FAULTS, faults_per_request=2, hang_s=2.5) as faulty:
        stats = run(fake_project, "generate.output_dir=data/faulty", "generate.cache_path=data/faulty.sqlite",
                    "generate.client.timeout_s=1.0")
        assert set(faulty.state.injected) == set(TRANSIENT_FAULTS)
    assert outputs(fake_project, "data/faulty") == clean
    assert stats["ledger_this_run"]["retries"] > 0 and stats["ledger_this_run"]["failed"] == 0


def test_rerun_sends_no_request_and_is_byte_identical(fake_project, fake_server):
    run(fake_project)
    first = outputs(fake_project)
    sent = fake_server.state.requests
    fake_server.stop()  # nothing may be sent: the server is gone
    stats = run(fake_project)
    assert outputs(fake_project) == first
    assert stats["ledger_this_run"] == {} and fake_server.state.requests == sent


def test_same_seed_same_prompts_other_seed_other_prompts():
    space = load_prompt_space(REPO / "prompts")
    assert sample_specs(space, 50, 5, seed=1) == sample_specs(space, 50, 5, seed=1)
    assert sample_specs(space, 50, 5, seed=1) != sample_specs(space, 50, 5, seed=2)
    specs = sample_specs(space, 300, 0, seed=3)
    assert len({json.dumps(s["attributes"], sort_keys=True) for s in specs}) == 300  # no repeated combination


def _stage_cmd(project: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline", "generate", "-q", "--config", str(project / "params.yaml")]


@pytest.mark.slow
@pytest.mark.parametrize("repair_rounds", [0, 1])
def test_kill9_mid_run_resumes_without_resending(tmp_path, repair_rounds):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    params = fake_params(n_exercises=40, n_textbooks=0, concurrency=2)
    params["generate"]["repair_rounds"] = repair_rounds
    wrong = 1 if repair_rounds else 0  # with repairs: half the first answers fail an assert and are repaired
    with FakeOpenAIServer(wrong_asserts=wrong) as clean_srv:  # the uninterrupted reference run
        clean = make_project(tmp_path / "clean", params)
        use_server(clean, clean_srv.base_url)
        subprocess.run(_stage_cmd(clean), cwd=clean, env=env, check=True)
    if repair_rounds:
        stats = json.loads((clean / "data/generate/stats.json").read_text())
        assert stats["repair"]["exercises_repaired"] >= 10
    project = make_project(tmp_path / "p", params)
    with FakeOpenAIServer(port=clean_srv.port, latency_s=0.05, wrong_asserts=wrong) as srv:  # same endpoint, slower
        use_server(project, srv.base_url)
        proc = subprocess.Popen(_stage_cmd(project), cwd=project, env=env)
        deadline = time.monotonic() + 60
        while sum(srv.state.successes.values()) < 12 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        answered_before = set(srv.state.successes)
        with sqlite3.connect(project / "data/cache/requests.sqlite") as db:
            committed = db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
        assert 12 <= len(answered_before) < 40 and committed >= len(answered_before) - 2
        assert not (project / "data/generate/exercises.jsonl").exists()  # killed before any output
        srv.state.attempts.clear()
        srv.state.successes.clear()
        subprocess.run(_stage_cmd(project), cwd=project, env=env, check=True)
        resent = answered_before & set(srv.state.attempts)
        # Only requests answered but not yet committed when the kill landed (at most the
        # two in flight) may go out again; everything committed is served from the cache.
        assert len(resent) <= len(answered_before) - committed <= 2
    assert outputs(project) == outputs(clean)


@pytest.mark.slow
def test_a_replica_killed_mid_run_loses_nothing_and_ends_with_the_clean_dataset(project):
    # Three real llama.cpp servers behind one remote preset, one slot and one thread each: a request's
    # answer then depends on neither the server nor the load, so the two runs can be compared byte for byte.
    import dataclasses
    import threading

    from pipeline.core.config import REPO_ROOT, load_preset
    from pipeline.engines.servers import ManagedProcess, free_port, llama_server_command

    smol = load_preset("smollm2-135m-instruct", REPO_ROOT / "configs")
    smol = dataclasses.replace(smol, server=dataclasses.replace(smol.server, program="llama-server", n_parallel=1))
    ports = [free_port() for _ in range(3)]
    procs = [ManagedProcess(llama_server_command(smol, port, 1), port, project / f"logs/replica-{i}.log", "/health")
             for i, port in enumerate(ports)]
    add_preset(project, "fleet", engine="remote", model=smol.model, api="chat", hf_id=smol.hf_id,
               base_urls=[p.base_url for p in procs])
    settings = ["generate.teacher=fleet", "generate.n_exercises=8", "generate.n_textbooks=1",
                "generate.sampling.max_tokens=64", "generate.client.length_retries=0",
                "generate.client.concurrency=6", "generate.client.endpoint_cooldown_s=60"]
    try:
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.wait_healthy(120)
        clean_stats = run(project, *settings, "generate.output_dir=data/clean", "generate.cache_path=data/clean.sqlite")
        assert clean_stats["ledger_this_run"]["failovers"] == 0

        cache = project / "data/killed.sqlite"

        def answers() -> int:
            try:
                return sqlite3.connect(cache).execute("SELECT COUNT(*) FROM responses").fetchone()[0]
            except sqlite3.OperationalError:  # the stage has not created its cache table yet
                return 0

        def kill_after_first_answers() -> None:  # mid-run: once two answers are committed, replica 0 dies
            while answers() < 2:
                time.sleep(0.05)
            os.killpg(procs[0].proc.pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_after_first_answers, daemon=True)
        killer.start()
        stats = run(project, *settings, "generate.output_dir=data/killed", f"generate.cache_path={cache}")
        killer.join(5)
    finally:
        for proc in procs:
            proc.stop()
    led = stats["ledger_this_run"]
    assert procs[0].proc.returncode == -signal.SIGKILL
    assert outputs(project, "data/killed") == outputs(project, "data/clean")  # the same dataset, byte for byte
    assert led["failed"] == 0 and led["failovers"] >= 1 and led["by_endpoint"][0]["failed"] >= 1
    assert clean_stats["ledger_this_run"]["requests_sent"] == 9
    assert led["requests_sent"] == 9 + led["failovers"] == 9 + led["retries"]  # nothing that succeeded was resent
    assert led["by_endpoint"][1]["failed"] == led["by_endpoint"][2]["failed"] == 0


def test_repair_round_fixes_failing_asserts_and_keeps_the_evidence(fake_project, fake_server):
    fake_server.state.wrong_asserts = 1
    stats = run(fake_project, "generate.repair_rounds=1", "generate.n_textbooks=0")
    ex = [json.loads(x) for x in (fake_project / "data/generate/exercises.jsonl").read_text().splitlines()]
    repaired = [e for e in ex if "repairs" in e]
    assert repaired and len(repaired) == stats["repair"]["exercises_repaired"] == stats["repair"]["requests"]
    for e in repaired:
        (entry,) = e["repairs"]
        name = e["parsed"]["function_name"]
        # The teacher was shown the failing assert with the value the function returned.
        k = int(e["parsed"]["solution"].split("return x + ")[1])
        assert entry["outcome"] == "accepted"
        assert entry["failures"] == [f"`assert {name}(10) == {11 + k}` failed: `{name}(10)` is {10 + k}, expected {11 + k}"]
        assert f"assert {name}(10)" in entry["raw_before"] and f"assert {name}(10)" not in e["parsed"]["tests"]
        # Its tokens are the first answer's plus the repair's.
        assert e["usage"]["completion_tokens"] > len(e["raw"]) // 4
    unrepaired = [e for e in ex if "repairs" not in e]
    assert unrepaired and all(f"({10})" not in e["parsed"]["tests"] for e in unrepaired)
    # Without repair rounds the same failing answers are kept as they are (the filter judges them).
    stats0 = run(fake_project, "generate.n_textbooks=0", "generate.output_dir=data/norepair")
    assert stats0["repair"]["requests"] == 0 and stats0["kept"]["exercise"] == len(ex)


def test_repair_config_errors_name_the_key(fake_project):
    with pytest.raises(ConfigError, match=r"generate.repair_rounds: needs generate.sampling.n = 1"):
        run(fake_project, "generate.repair_rounds=1", "generate.sampling.n=2")
    with pytest.raises(ConfigError, match="generate.repair_rounds: must be >= 0"):
        run(fake_project, "generate.repair_rounds=-1")
    with pytest.raises(ConfigError, match="template not found: .*nope.j2"):
        run(fake_project, "generate.repair_rounds=1", "generate.repair_template=nope.j2")
    with pytest.raises(ConfigError, match="generate.topics_file: missing .*absent.yaml"):
        run(fake_project, "generate.topics_file=absent.yaml")


def test_budget_cap_stops_cleanly_and_resumes(fake_project, fake_server):
    # Each fake answer costs about $0.0002 at these prices, its worst case (384 max_tokens) about
    # $0.001: the run stops once a worst case no longer fits, after a few.
    stats = run(fake_project, "generate.client.budget_usd=0.0025", "generate.client.concurrency=1")
    assert stats["stopped_by_budget"] and 0 < stats["completed"] < 15
    assert stats["not_attempted"] == 15 - stats["completed"]
    kept = (fake_project / "data/generate/exercises.jsonl").read_text().splitlines()
    assert len(kept) == stats["kept"]["exercise"] > 0
    first_completed, sent = stats["completed"], fake_server.state.requests
    stats = run(fake_project)  # no cap: finishes, re-sending nothing already paid for
    assert stats["completed"] == 15 and not stats["stopped_by_budget"]
    assert fake_server.state.requests - sent == 15 - first_completed


def test_cut_and_unparseable_answers_go_to_rejected_with_reason(fake_project):
    with FakeOpenAIServer(faults=("length", "malformed"), faults_per_request=5) as srv:
        srv._fault_for = lambda digest, attempt: "length" if int(digest[:2], 16) % 2 else None
        use_server(fake_project, srv.base_url)
        stats = run(fake_project, "generate.client.length_retries=1", "generate.salvage_truncated=false")
    rejected = [json.loads(x) for x in (fake_project / "data/generate/rejected.jsonl").read_text().splitlines()]
    assert rejected and all(r["reason"] == "finish_reason=length" and r["raw"] for r in rejected)
    assert stats["rejected_by_reason"] == {"finish_reason=length": len(rejected)}
    assert stats["kept"]["exercise"] + stats["kept"]["textbook"] + len(rejected) == 15


def test_an_exercise_cut_in_a_loop_of_asserts_is_salvaged_and_one_cut_in_its_function_is_not(fake_project):
    with FakeOpenAIServer(faults=("loop",)) as srv:
        # Odd digests loop in their tests; 0x?0 digests among the rest are cut in half (inside the function).
        srv._fault_for = lambda digest, attempt: ("loop" if int(digest[:2], 16) % 2
                                                  else "length" if digest[1] == "0" else None)
        use_server(fake_project, srv.base_url)
        off = run(fake_project, "generate.salvage_truncated=false", "generate.output_dir=data/off")
        on = run(fake_project, "generate.salvage_truncated=true")
    kept = [json.loads(x) for x in (fake_project / "data/generate/exercises.jsonl").read_text().splitlines()]
    salvaged = [r for r in kept if r.get("salvaged") == "length"]
    assert salvaged and on["salvaged_from_length"] == len(salvaged) and off["salvaged_from_length"] == 0
    assert on["kept"]["exercise"] == off["kept"]["exercise"] + len(salvaged)
    for rec in salvaged:  # the repeated assert collapses to one; the half-written one is gone
        tests = rec["parsed"]["tests"].splitlines()
        assert len(tests) == len(set(tests)) == 3 and all(t.startswith("assert ") and "==" in t for t in tests)
        assert rec["finish_reason"] == "length" and rec["parsed"]["solution"].strip().startswith("return x +")
    cut = [json.loads(x) for x in (fake_project / "data/generate/rejected.jsonl").read_text().splitlines()]
    exercises_cut = [r for r in cut if r["kind"] == "exercise"]
    assert all(r["reason"] == "finish_reason=length" for r in cut)
    assert all(r["detail"].startswith("truncated:") for r in exercises_cut)


def _error_lines(caplog) -> list[str]:
    """The stage's failure as stage_cli logs it (on stderr from the CLI): one ERROR line."""
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


def test_an_unreachable_endpoint_fails_the_stage_with_one_line_and_writes_nothing(project, caplog):
    use_server(project, "http://127.0.0.1:9/v1")  # a closed port
    assert cli_main(["generate", "-q"]) == 1
    (line,) = _error_lines(caplog)
    assert line.startswith("generate failed: 15 request(s) failed at preset 'fake' at http://127.0.0.1:9/v1 (")
    assert line.endswith("0 answered and cached; run again: only the 15 failed requests are sent")
    # One request used up its retries (6 by default) and the endpoint was given up: the ones still waiting
    # to be retried stop (at most one per slot), the rest are never sent.
    kinds = dict(kv.split(": ") for kv in line.split("(", 2)[2].split(")")[0].split(", "))
    assert set(kinds) == {"connection", "not_sent"} and int(kinds["connection"]) <= 4
    assert int(kinds["connection"]) + int(kinds["not_sent"]) == 15
    assert not (project / "data/generate/exercises.jsonl").exists()  # no partial dataset for the next stage
    assert not (project / "data/generate/rejected.jsonl").exists()  # a failed request is not a rejection


def _twenty(project: Path, url: str) -> None:
    params = fake_params(n_exercises=16, n_textbooks=4)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    use_server(project, url)


def test_two_of_twenty_fail_the_stage_and_the_rerun_sends_exactly_those_two(project, caplog):
    with FakeOpenAIServer() as clean:  # the reference: the same requests, nothing failing
        _twenty(project, clean.base_url)
        run(project, "generate.output_dir=data/clean", "generate.cache_path=data/clean.sqlite")
    with FakeOpenAIServer(port=clean.port, fail_first_bodies=2) as srv:
        assert cli_main(["generate", "-q"]) == 1
        (line,) = _error_lines(caplog)
        assert line == (f"generate failed: 2 request(s) failed at preset 'fake' at {srv.base_url} "
                        "(server_error: 2); 18 answered and cached; run again: only the 2 failed requests are sent")
        assert not (project / "data/generate/exercises.jsonl").exists()
        failing, answered = set(srv.state.failing), set(srv.state.successes_canonical)
        assert len(failing) == 2 and len(answered) == 18
        srv.state.failing.clear()  # the endpoint recovers
        srv.state.fail_first_bodies = 0
        sent = srv.state.requests
        assert cli_main(["generate", "-q"]) == 0
        assert srv.state.requests - sent == 2 and srv.state.successes_canonical - answered == failing
    ledger = json.loads((project / "data/generate/stats.json").read_text())["ledger_this_run"]
    assert ledger["requests_sent"] == 2 and ledger["cache_hits"] == 18 and ledger["failed"] == 0
    assert outputs(project) == outputs(project, "data/clean")


def test_max_failed_fraction_accepts_a_partial_run_and_the_stats_say_what_was_lost(project, capsys):
    from pipeline.core.stats import funnel_row

    with FakeOpenAIServer(fail_first_bodies=2) as srv:
        _twenty(project, srv.base_url)
        with pytest.raises(RequestsFailed):  # 2 of 20 is more than 5%
            run(project, "generate.client.max_failed_fraction=0.05")
        stats = run(project, "generate.client.max_failed_fraction=0.1")
    assert stats["lost"] == 2 and stats["failed_requests"] == 2 and stats["failed_by_error"] == {"server_error": 2}
    assert stats["kept"]["exercise"] + stats["kept"]["textbook"] == 18 and stats["rejected"] == 0
    assert json.loads((project / "data/generate/stats.json").read_text())["lost"] == 2
    # The dataset card's funnel (decontaminate) lists them.
    assert funnel_row("generate", stats)["reasons"] == {
        "lost (request failed, accepted by client.max_failed_fraction)": 2}


@pytest.mark.parametrize("fault, said", [("key", "Incorrect API key provided"), (404, "does not exist")])
def test_a_wrong_key_or_model_stops_at_once_naming_preset_url_and_what_the_server_said(project, capsys,
                                                                                     caplog, monkeypatch, fault, said):
    secret = "sk-live-0123456789abcdefghij"
    monkeypatch.setenv("FAKE_SECRET_KEY", secret)
    state = {"api_key": "sk-another-key-000000000"} if fault == "key" else {"status": fault}
    with FakeOpenAIServer(**state) as srv:
        use_server(project, srv.base_url, api_key_env="FAKE_SECRET_KEY")
        assert cli_main(["generate", "-q"]) == 1
        assert srv.state.requests <= 4  # no retries; nothing sent after the first answer but what was in flight
    out = capsys.readouterr()
    (line,) = _error_lines(caplog)
    status = 401 if fault == "key" else 404
    assert line.startswith("generate failed: ")
    assert f"preset 'fake' at {srv.base_url} answered HTTP {status}" in line and said in line
    assert secret not in out.err + out.out + caplog.text and secret[-8:] not in line
    for path in Path("data").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_batch_run_writes_the_online_run_s_dataset_at_half_the_price(project, fake_server):
    use_server(project, fake_server.base_url, batch_api=True, price={"prompt_per_mtok": 1.0, "completion_per_mtok": 2.0})
    online = run(project, "generate.output_dir=data/online", "generate.cache_path=data/online.sqlite")
    assert fake_server.state.batches_created == 0
    batch = run(project, "generate.client.batch=true", "generate.client.batch_poll_s=0.01")
    assert fake_server.state.batches_created == 1 and fake_server.state.batch_items == 15
    assert outputs(project) == outputs(project, "data/online")
    assert batch["cost_usd"] == pytest.approx(online["cost_usd"] / 2, abs=1e-6)  # rounded to 6 places
    assert batch["ledger_this_run"]["batches_submitted"] == 1
    # An online run from the batch run's cache sends nothing and writes the same dataset.
    sent = fake_server.state.requests
    again = run(project, "generate.output_dir=data/again")
    assert again["ledger_this_run"] == {} and fake_server.state.requests == sent
    assert outputs(project, "data/again") == outputs(project)


def test_batch_run_with_repair_rounds_sends_one_batch_per_wave(project, fake_server):
    fake_server.state.wrong_asserts = 1
    use_server(project, fake_server.base_url, batch_api=True)
    common = ("generate.repair_rounds=1", "generate.n_textbooks=0")
    online = run(project, *common, "generate.output_dir=data/online", "generate.cache_path=data/online.sqlite")
    assert online["repair"]["exercises_repaired"] > 0
    batch = run(project, *common, "generate.client.batch=true", "generate.client.batch_poll_s=0.01")
    assert fake_server.state.batches_created == 2  # the first answers, then the repairs
    assert fake_server.state.batch_items == 12 + online["repair"]["requests"]
    assert batch["repair"] == online["repair"] and outputs(project) == outputs(project, "data/online")


def test_a_batch_run_killed_after_submission_resumes_without_submitting_again(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    params = fake_params(n_exercises=12, n_textbooks=3)
    with FakeOpenAIServer() as srv:
        online = make_project(tmp_path / "online", params)
        use_server(online, srv.base_url, batch_api=True)
        subprocess.run(_stage_cmd(online), cwd=online, env=env, check=True)
        srv.state.batch_polls_to_finish = 0  # submitted batches stay in progress: the run waits, polling
        project = make_project(tmp_path / "p", params)
        use_server(project, srv.base_url, batch_api=True)
        cmd = [*_stage_cmd(project), "--set", "generate.client.batch=true", "--set", "generate.client.batch_poll_s=0.05"]
        proc = subprocess.Popen(cmd, cwd=project, env=env)
        deadline = time.monotonic() + 60
        while not srv.state.batch_polls and time.monotonic() < deadline:  # polled: its id is saved
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert srv.state.batches_created == srv.state.uploads == 1
        assert not (project / "data/generate/exercises.jsonl").exists()
        srv.state.batch_polls_to_finish = 1  # the batch ends
        resumed = subprocess.run(cmd, cwd=project, env=env, check=True, capture_output=True, text=True)
        assert srv.state.batches_created == srv.state.uploads == 1 and srv.state.batch_items == 15  # not paid twice
        assert "resuming 1 batch(es)" in resumed.stderr
    stats = json.loads((project / "data/generate/stats.json").read_text())
    assert stats["ledger_this_run"]["batches_resumed"] == 1 and stats["ledger_this_run"]["batches_submitted"] == 0
    assert outputs(project) == outputs(online)


def test_missing_api_key_is_a_clear_error_before_any_work(project, fake_server, monkeypatch, capsys):
    monkeypatch.delenv("FAKE_SECRET_KEY", raising=False)
    use_server(project, fake_server.base_url, api_key_env="FAKE_SECRET_KEY")
    assert cli_main(["generate", "-q"]) == 2
    assert "FAKE_SECRET_KEY" in capsys.readouterr().err
    assert fake_server.state.requests == 0 and not (project / "data").exists()


def test_api_key_never_reaches_outputs(project, fake_server, monkeypatch):
    monkeypatch.setenv("FAKE_SECRET_KEY", "sk-very-secret-value-123")
    use_server(project, fake_server.base_url, api_key_env="FAKE_SECRET_KEY")
    run(project)
    for path in Path("data").rglob("*"):
        if path.is_file():
            assert b"sk-very-secret-value-123" not in path.read_bytes(), path


@pytest.mark.parametrize(
    "change, message",
    [
        ("generate.teacher=no-such-model", "unknown model preset 'no-such-model'"),
        ("generate.exercise_template=broken.j2", "'nonexistent_variable' is undefined"),
        ("generate.prompts_dir=empty_prompts", "'topics' must be a non-empty mapping"),
    ],
)
def test_bad_input_fails_with_a_message_naming_it(project, capsys, change, message):
    (project / "prompts" / "broken.j2").write_text("Write about {{ topic }} and {{ nonexistent_variable }}.")
    (project / "empty_prompts").mkdir()
    for name in ("audiences.yaml", "names.yaml"):
        (project / "empty_prompts" / name).write_text((project / "prompts" / name).read_text())
    (project / "empty_prompts" / "topics.yaml").write_text("topics: {}\n")
    add_preset(project, "fake", engine="remote", model="m", base_url="http://127.0.0.1:9/v1")
    assert cli_main(["generate", "-q", "--set", change]) == 2
    assert message in capsys.readouterr().err


def test_parse_exercise_variants():
    fn = 'def f(x: int) -> int:\n    """Add one."""\n    return x + 1\n'
    got = parse_exercise(f"```python\n{fn}```\n```python\nassert f(1) == 2\n```")
    assert got["prompt"] == 'def f(x: int) -> int:\n    """Add one."""' and got["solution"] == "    return x + 1"
    nested = parse_exercise(f"```python\nimport math\n\n{fn}\ndef test_f():\n    assert f(2) == 3\n```")
    assert nested["tests"] == "assert f(2) == 3" and nested["imports"] == "import math"
    for text, reason in [("no code here", "no_code_block"), (f"```python\n{fn}```", "no_assert_tests"),
                         ("```python\ndef f(:\n```", "syntax_error"),
                         ("```python\ndef f(x):\n    return x\nassert f(1) == 1\n```", "no_function_with_docstring")]:
        with pytest.raises(ParseError, match=reason):
            parse_exercise(text)
    with pytest.raises(ParseError, match="too_little_prose"):
        parse_textbook("# T\n```python\nx = 1\n```")


def test_textbooks_have_their_own_token_cap(fake_project):
    cfg = load_config(fake_project / "params.yaml", ["generate.sampling.max_tokens=300",
                                                     "generate.textbook_max_tokens=700"])
    from pipeline.core.config import load_preset
    from pipeline.stages.generate import build_requests

    specs = sample_specs(load_prompt_space(fake_project / "prompts"), 2, 2, 7)
    reqs = build_requests(specs, cfg.generate, load_preset("fake", fake_project / "configs"), 7, fake_project / "prompts")
    assert [r.params["max_tokens"] for r in reqs] == [300, 300, 700, 700]
    with pytest.raises(ConfigError, match="generate.textbook_max_tokens: must be >= 0"):
        load_config(fake_project / "params.yaml", ["generate.textbook_max_tokens=-1"])
