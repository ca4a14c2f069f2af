"""Training under `accelerate launch`: N processes (DDP, gloo on the CPU here) follow one process's loss
curve with the same config, write one adapter once, from the main process; the multi-GPU profile and
its FSDP-QLoRA setting reach bitsandbytes. No GPU here: FSDP itself is not run (docs/training.md)."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.core.config import ConfigError, FinetuneConfig, load_config
from pipeline.engines.student import quantization_config
from pipeline.engines.training import per_process_batch

from .conftest import REPO
from .test_finetune import ft_project, read_tsv, run

# Logs every write a process makes under WATCH_DIR (files opened for writing, renames), one JSON line
# per event in WRITES_DIR/<RANK>.jsonl: Python's audit hooks see what the process really does, so the
# test can tell which process wrote what. safetensors writes from Rust, unseen, but the adapter folder
# only appears through the rename into place, which is seen.
AUDIT_HOOK = '''
import json, os, sys
_watch, _log = os.environ["WATCH_DIR"], os.environ["WRITES_DIR"]
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT
def _hook(event, args):
    if event == "open" and not isinstance(args[0], int):
        path, mode, flags = os.fsdecode(os.fspath(args[0])), args[1], args[2] if len(args) > 2 else 0
        if not (set(str(mode or "")) & set("wax+") or (isinstance(flags, int) and flags & _WRITE)):
            return
        what = path
    elif event == "os.rename" and not isinstance(args[1], int):
        path = os.fsdecode(os.fspath(args[1]))
        what = path + " <- rename"
    else:
        return
    if path.startswith(_watch):
        with open(os.path.join(_log, os.environ.get("RANK", "launcher") + ".jsonl"), "a") as fh:
            fh.write(json.dumps(what[len(_watch):]) + "\\n")
with open(os.path.join(_log, os.environ.get("RANK", "launcher") + ".jsonl"), "a") as fh:
    fh.write(json.dumps("<started>") + "\\n")  # so a process that wrote nothing is seen to have run
sys.addaudithook(_hook)
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_global_batch_is_the_configs_on_any_number_of_processes():
    def split(batch, accum, n):
        return per_process_batch(FinetuneConfig(batch_size=batch, grad_accum=accum), n)

    assert split(4, 1, 1) == (4, 1) and split(4, 1, 2) == (2, 1)  # the test below
    assert split(2, 4, 2) == (2, 2)  # the micro-batch a device was sized for is kept; accumulation shrinks
    assert split(16, 8, 8) == (16, 1)  # the h100x8 profile
    assert split(6, 2, 4) == (3, 1)  # a share of 3: micro-batches of 3, not 6
    for batch, accum, n in [(4, 1, 1), (2, 4, 2), (16, 8, 8), (6, 2, 4), (5, 3, 5), (3, 4, 6)]:
        micro, steps = split(batch, accum, n)
        assert micro * steps * n == batch * accum and micro <= batch
    with pytest.raises(ConfigError, match="batch_size x finetune.grad_accum = 4 .* between 8 processes"):
        split(4, 1, 8)


@pytest.mark.slow
def test_two_processes_follow_one_process_and_write_one_adapter(tmp_path, monkeypatch, tiny_dir):
    """The same config (QLoRA, global batch 4) on one process and on two (`accelerate launch`, gloo): the
    same per-step losses and gradient norms, and one adapter, written once, by the main process."""
    monkeypatch.chdir(tmp_path)
    # Dropout off: each process draws its own masks, so with dropout the two runs see different noise.
    # No held-out split and one checkpoint keep the run short; 3 steps of 4 of the 20 packed rows stay
    # within the first epoch, where both runs see the same rows in the same steps.
    keys = dict(quantization="nf4", compute_dtype="float32", lora_dropout=0.0, batch_size=4, grad_accum=1,
                max_steps=3, save_steps=3, eval_fraction=0.0, export_gguf=False)
    one_params, _ = ft_project(tmp_path / "one", tiny_dir, **keys)
    two_params, _ = ft_project(tmp_path / "two", tiny_dir, **keys)

    t0 = time.monotonic()
    one = run(one_params)
    one_s = time.monotonic() - t0

    out = tmp_path / "two" / "out"
    hooks, writes = tmp_path / "hooks", tmp_path / "writes"
    hooks.mkdir()
    writes.mkdir()
    (hooks / "sitecustomize.py").write_text(AUDIT_HOOK)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hooks), str(REPO)]), "HF_HUB_OFFLINE": "1",
           "DVC_NO_ANALYTICS": "1", "WATCH_DIR": str(out) + os.sep, "WRITES_DIR": str(writes)}
    accelerate = Path(sys.executable).with_name("accelerate")
    t0 = time.monotonic()
    proc = subprocess.run([str(accelerate), "launch", "--config_file", str(REPO / "configs/accelerate/ddp.yaml"),
                           "--num_processes", "2", "--main_process_port", str(free_port()),
                           "-m", "pipeline", "finetune", "--config", str(two_params), "-q"],
                          cwd=tmp_path / "two", env=env, capture_output=True, text=True, timeout=300)
    two_s = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((out / "metrics.json").read_text())
    print(f"\none process {one_s:.0f} s, two processes {two_s:.0f} s (with start-up)")

    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["global_batch"] == two["global_batch"] == 4
    assert (one["per_device_batch"], two["per_device_batch"]) == (4, 2)
    assert one["steps"] == two["steps"] == 3 and one["quantization"] == two["quantization"] == "nf4"
    assert one["train_tokens"] == two["train_tokens"]  # the same rows, counted across both processes
    # The gradient of a step is the mean over the target tokens of the whole global batch in both runs
    # (the Trainer counts the tokens across processes); what differs is fp32 rounding: two half-batches
    # padded to their own widths, and a sum of two gradients. Measured: 1e-6 apart on a loss of 10.8
    # (1e-7 relative); 1e-5 relative would still catch a wrong batch (a row more or less moves a step's
    # loss by about 1e-3 here) or a loss averaged per process instead of per token.
    plots = "dvclive/plots/metrics/train"
    for name in ("loss", "grad_norm", "learning_rate"):
        a, b = read_tsv(tmp_path / "one" / "out" / plots / f"{name}.tsv"), read_tsv(out / plots / f"{name}.tsv")
        print(name, [round(v, 7) for _, v in a], [round(v, 7) for _, v in b])
        assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3], name
        assert all(math.isclose(x, y, rel_tol=1e-5) for (_, x), (_, y) in zip(a, b, strict=True)), (name, a, b)

    # One adapter, the same as one process's (up to the same rounding), and one summary line.
    from safetensors.torch import load_file

    ref, got = (load_file(d / "out" / "adapter" / "adapter_model.safetensors") for d in (tmp_path / "one", tmp_path / "two"))
    assert ref.keys() == got.keys()
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=1e-6)
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "checkpoints", "dvclive", "heldout.jsonl",
                                                     "metrics.json", "resolved_config.yaml"]
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["README.md", "adapter_config.json",
                                                                  "adapter_model.safetensors"]
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["steps"] == 3 and summaries[0]["train_loss"] == two["train_loss"]

    # Written once, by the main process: the adapter was renamed into place once, by RANK 0, and the other
    # process wrote nothing under out/ from Python. (Its RNG state, checkpoint-3/rng_state_1.pth, is
    # written by torch's C++ writer, unseen here: the Trainer keeps one per process, for an exact resume.)
    logs = {p.stem: [json.loads(line) for line in p.read_text().splitlines()] for p in writes.glob("*.jsonl")}
    renames = [(rank, w) for rank, ws in logs.items() for w in ws if w.startswith("adapter <- rename")]
    assert renames == [("0", "adapter <- rename")], renames
    assert logs["1"] == ["<started>"], logs["1"]
    assert (out / "checkpoints" / "checkpoint-3" / "rng_state_1.pth").is_file()
    assert any(w.startswith("metrics.json") for w in logs["0"]) and "resolved_config.yaml" in str(logs["0"])


def test_the_multi_gpu_profile_and_the_fsdp_quant_storage(monkeypatch):
    """h100x8 loads and validates; its quant storage (and auto's, under an FSDP launch) reaches
    BitsAndBytesConfig; the accelerate configs say what docs/training.md promises."""
    cfg = load_config(REPO / "params.yaml", ["profile=h100x8"])
    ft = cfg.finetune
    assert (ft.quantization, ft.compute_dtype, ft.quant_storage) == ("nf4", "bfloat16", "bfloat16")
    assert per_process_batch(ft, 8) == (16, 1) and per_process_batch(ft, 1) == (16, 8)
    bnb = quantization_config(ft.quantization, ft.double_quant, torch.bfloat16, ft.quant_storage)
    assert bnb.bnb_4bit_quant_storage == torch.bfloat16 and bnb.bnb_4bit_compute_dtype == torch.bfloat16
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_use_double_quant

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert quantization_config("nf4", True, torch.bfloat16, "auto").bnb_4bit_quant_storage == torch.uint8
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` exports under fsdp_qlora.yaml
    assert quantization_config("nf4", True, torch.bfloat16, "auto").bnb_4bit_quant_storage == torch.bfloat16
    with pytest.raises(ConfigError, match="finetune.quant_storage=uint8: under FSDP"):
        quantization_config("nf4", True, torch.bfloat16, "uint8")
    assert quantization_config("none", True, torch.bfloat16, "auto") is None
    with pytest.raises(ConfigError, match="finetune.quant_storage"):
        FinetuneConfig(quant_storage="int4")

    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    fsdp = load_config_from_file(str(REPO / "configs/accelerate/fsdp_qlora.yaml"))
    assert fsdp.distributed_type == DistributedType.FSDP
    assert {k: fsdp.fsdp_config[k] for k in ("fsdp_cpu_ram_efficient_loading", "fsdp_state_dict_type",
                                             "fsdp_use_orig_params", "fsdp_auto_wrap_policy")} == {
        "fsdp_cpu_ram_efficient_loading": True, "fsdp_state_dict_type": "SHARDED_STATE_DICT",
        "fsdp_use_orig_params": False, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}
    ddp = load_config_from_file(str(REPO / "configs/accelerate/ddp.yaml"))
    assert ddp.distributed_type == DistributedType.MULTI_GPU and not yaml.safe_load(
        (REPO / "configs/accelerate/ddp.yaml").read_text())["use_cpu"]


@pytest.mark.slow
def test_bf16_quant_storage_loads_a_4bit_student(tiny_dir):
    """The setting is not only in the config object: the student's 4-bit weights are stored in bf16."""
    import bitsandbytes as bnb

    from pipeline.core.config import ModelPreset
    from pipeline.engines.student import load_student

    preset = ModelPreset(name="tiny", engine="vllm", model="tiny", api="completions", hf_id=str(tiny_dir))
    model, _ = load_student(preset, "nf4", True, torch.float32, "cpu", quant_storage="bfloat16")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.dtype == torch.bfloat16 for m in layers)
    assert model.config.quantization_config.bnb_4bit_quant_storage == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
