"""Finetune stage, phi-1's phase 2: QLoRA (or plain LoRA) of the student on the curated exercises.

Input: `{finetune.dataset_dir}/train.jsonl`, the records of the kinds in `finetune.kinds` (phi-1
fine-tunes on exercises only: `[exercise]`; the dataclass default keeps textbooks too). Where it
starts (`pretrain.enabled`, `pretrain.mode`):

- pretrain off: a new LoRA on the student base;
- pretrain `lora`: phase 1's adapter (`{pretrain.output_dir}/weights/adapter`), trained further, so
  one adapter carries both phases and llama.cpp serves it as before;
- pretrain `full` or `scratch`: a new LoRA on phase 1's model (`{pretrain.output_dir}/weights/model`).

`finetune.source` trains on a control arm instead, sampled to the curated records' target tokens:
the filter's rejects, the committed stdlib functions, or the corpus stage's natural code, unfiltered
(`corpus`) or as its classifier kept it (`corpus_filtered`): :func:`source_records`.

`finetune.enabled: false` passes phase 1's adapter through (pretrain `lora` only), so the
ablation "textbooks only" is `dvc exp run -S finetune.enabled=false -S pretrain.enabled=true`.
How the student is trained (the format, packing, checkpoints that resume, the divergence guard):
:mod:`pipeline.engines.training`.

Outputs (in `finetune.output_dir`): adapter/ (PEFT safetensors), adapter.gguf (llama.cpp
LoRA), merged/ (optional bf16 merged model), metrics.json, dvclive/ (per-step plots: loss,
eval loss, learning rate, grad norm, tokens/s), resolved_config.yaml, checkpoints/.

    textbook finetune --set finetune.student=smollm2-135m-instruct --set finetune.max_steps=4
    accelerate launch --config_file configs/accelerate/ddp.yaml -m pipeline finetune   # N processes

Under `accelerate launch` every process runs this stage and trains its share of each global batch;
the main process alone writes the outputs and prints the summary.
"""

from __future__ import annotations

import logging
import random
import shutil
import time
from pathlib import Path

from pipeline.core.artifacts import FinetuneMetrics
from pipeline.core.config import CORPUS_SOURCES, ConfigError, ModelPreset, RunConfig, configs_dir, load_preset
from pipeline.core.records import RecordError, iter_jsonl, write_jsonl
from pipeline.core.stage import stage_cli, write_resolved_config
from pipeline.engines.training import (
    TrainingDiverged,
    load_records,
    process_state,
    replica_stdout,
    train_adapter,
)

log = logging.getLogger(__name__)


def phase_one_output(cfg: RunConfig, preset: ModelPreset) -> tuple[ModelPreset, Path | None]:
    """(the student to train, the adapter to continue) after phase 1, as `pretrain.*` says."""
    pt = cfg.pretrain
    model = pt.trained_model(preset)
    if model is not None:
        return model, None
    return preset, (pt.weights_dir / "adapter" if pt.enabled else None)


def sample_records(records: list[dict], n: int, seed: int) -> list[dict]:
    """A seeded sample of n records (all when n is 0 or more than there are), sorted by id; samples of one
    seed are nested, so a pass@1-against-examples curve adds data rather than drawing new data."""
    if not n or n >= len(records):
        return records
    order = sorted(records, key=lambda r: r["id"])
    random.Random(seed).shuffle(order)
    return sorted(order[:n], key=lambda r: r["id"])


def heldout_split(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(kept for training, held out): a seeded share of the records, both sorted by id; the same draw for
    every arm and training seed (`seed` is the run seed)."""
    if fraction <= 0 or len(records) < 2:
        return records, []
    order = sorted(records, key=lambda r: r["id"])
    random.Random(f"heldout:{seed}").shuffle(order)
    n = min(max(1, round(len(order) * fraction)), len(order) - 1)
    return sorted(order[n:], key=lambda r: r["id"]), sorted(order[:n], key=lambda r: r["id"])


def match_tokens(records: list[dict], counts: dict[str, int], target: int, seed: int) -> list[dict]:
    """A seeded sample of `records` whose target tokens (`counts` by id) come closest to `target`: records in
    a seeded order are taken while the total stays nearer to `target` than without them; sorted by id."""
    order = sorted(records, key=lambda r: r["id"])
    random.Random(f"match:{seed}").shuffle(order)
    chosen, total = [], 0
    for rec in order:
        n = counts[rec["id"]]
        if total >= target:
            break
        if abs(total + n - target) <= abs(total - target):
            chosen.append(rec)
            total += n
    return sorted(chosen, key=lambda r: r["id"])


def target_token_counts(records: list[dict], ft, preset: ModelPreset) -> dict[str, int]:
    """Target tokens of each record as training counts them (labels that are not ignored, within max_length)."""
    from pipeline.engines.student import load_tokenizer, model_source
    from pipeline.engines.training import IGNORE, tokenize_record

    tok = load_tokenizer(model_source(preset))
    chat = preset.api == "chat"
    return {r["id"]: sum(label != IGNORE for label in
                         tokenize_record(r, tok, ft.completion_only_loss, chat).labels[:ft.max_length])
            for r in records}


BUILD_CORPUS = "build the corpus first: `dvc repro corpus` with corpus.enabled=true (docs/corpus.md)"


def corpus_records(ft) -> tuple[list[dict], dict]:
    """The corpus arms' records: the exercise-kind records of `finetune.corpus_dir` (documented functions as
    exercises), for corpus_filtered only those whose ids the classifier kept (`finetune.corpus_kept`)."""
    if "exercise" not in ft.kinds:
        raise ConfigError(f"finetune.source={ft.source} trains on the corpus's exercise-kind records, which "
                          f"finetune.kinds={ft.kinds} leaves out")
    folder = Path(ft.corpus_dir)
    path = folder / "train.jsonl"
    if not path.is_file():
        raise ConfigError(f"finetune.corpus_dir: {path} not found (finetune.source={ft.source}): {BUILD_CORPUS}")
    try:
        records = load_records(folder, "finetune.corpus_dir")
    except ConfigError as exc:  # empty (the corpus was off) or malformed
        raise ConfigError(f"{exc} (finetune.source={ft.source}): {BUILD_CORPUS}") from None
    arm = [r for r in records if r["kind"] == "exercise"]
    if not arm:
        raise ConfigError(f"finetune.corpus_dir: {path} holds no exercise-kind records ({len(records)} of other "
                          f"kinds; finetune.source={ft.source}): {BUILD_CORPUS}")
    info = {"source_dir": str(folder)}
    if ft.source == "corpus":
        return arm, info
    kept_path = Path(ft.corpus_kept)
    if not kept_path.is_file():
        raise ConfigError(f"finetune.corpus_kept: {kept_path} not found (finetune.source=corpus_filtered): "
                          f"{BUILD_CORPUS}")
    try:
        kept = {r["id"] for r in iter_jsonl(kept_path, required=("id", "kind")) if r["kind"] == "exercise"}
    except RecordError as exc:
        raise ConfigError(f"finetune.corpus_kept: {exc}") from None
    if not kept:
        raise ConfigError(f"finetune.corpus_kept: {kept_path} holds no exercise-kind snippets the classifier kept "
                          f"(finetune.source=corpus_filtered; an empty file is a corpus stage run with "
                          f"corpus.enabled=false): {BUILD_CORPUS}")
    missing = kept - {r["id"] for r in arm}
    if missing:
        raise ConfigError(f"finetune.corpus_kept: {len(missing)} of the {len(kept)} kept exercise ids in {kept_path} "
                          f"(e.g. {min(missing)}) are not in {path}: the two come from different corpus builds; "
                          "rebuild both with `dvc repro corpus`")
    return [r for r in arm if r["id"] in kept], {**info, "source_kept": str(kept_path)}


def arm_records(ft) -> tuple[list[dict], dict]:
    """A control arm's records (`finetune.source`, not curated) and where they came from."""
    if ft.source in CORPUS_SOURCES:
        return corpus_records(ft)
    folder = Path(ft.rejected_dir if ft.source == "rejected" else ft.natural_dir)
    arm = [r for r in load_records(folder, f"finetune.{ft.source}_dir") if r["kind"] in ft.kinds]
    if not arm:
        raise ConfigError(f"finetune.source={ft.source}: {folder}/train.jsonl holds no records of the kinds "
                          f"{ft.kinds}")
    return arm, {"source_dir": str(folder)}


def source_records(cfg: RunConfig, preset: ModelPreset, curated: list[dict]) -> tuple[list[dict], dict]:
    """The records phase 2 trains on for `finetune.source`, and what was matched: the curated records as
    given, or a control arm sampled to the curated records' target tokens."""
    ft = cfg.finetune
    if ft.source == "curated":
        return curated, {"source": "curated"}
    arm, where = arm_records(ft)
    info = {"source": ft.source, **where, "source_records": len(arm)}
    if not ft.match_tokens:
        return arm, info
    counts = target_token_counts(curated + arm, ft, preset)
    want = sum(counts[r["id"]] for r in curated)
    chosen = match_tokens(arm, counts, want, cfg.seed)
    got = sum(counts[r["id"]] for r in chosen)
    if got < 0.95 * want:
        log.warning("finetune.source=%s: the arm has %d target tokens in all, under the curated records' %d",
                    ft.source, got, want)
    return chosen, {**info, "matched_target_tokens": {"curated": want, ft.source: got}}


def pass_through(cfg: RunConfig, out_dir: Path) -> dict:
    """finetune.enabled=false: phase 1's adapter is the final one."""
    if not cfg.pretrain.enabled or cfg.pretrain.mode != "lora":
        raise ConfigError("finetune.enabled=false passes phase 1's adapter through, which needs pretrain.enabled=true "
                          f"and pretrain.mode=lora (got enabled={cfg.pretrain.enabled}, mode={cfg.pretrain.mode}); "
                          "with full or scratch, evaluate 'pretrained' instead")
    weights = cfg.pretrain.weights_dir
    if not (weights / "adapter" / "adapter_config.json").is_file():
        raise ConfigError(f"finetune.enabled=false: phase 1's adapter {weights / 'adapter'}/ does not exist: "
                          "run `textbook pretrain` first")
    shutil.rmtree(out_dir / "adapter", ignore_errors=True)
    shutil.copytree(weights / "adapter", out_dir / "adapter")
    if (weights / "adapter.gguf").is_file():
        shutil.copyfile(weights / "adapter.gguf", out_dir / "adapter.gguf")
    return {"enabled": False, "passed_through": str(weights / "adapter"), "steps": 0}


def run_finetune(cfg: RunConfig, config_path: Path, progress: bool = True, callbacks: list | None = None) -> dict:
    """The stage's core: trains, writes the outputs, returns the metrics (also in metrics.json).

    `callbacks` are extra transformers TrainerCallbacks (tests use one to simulate a crash).
    """
    t0 = time.monotonic()
    ft = cfg.finetune
    root = configs_dir(config_path)
    preset = load_preset(ft.student, root)
    records = load_records(Path(ft.dataset_dir), "finetune")  # bad input fails before a model loads
    main = process_state().is_main_process  # under `accelerate launch`, only the main process writes
    out_dir = Path(ft.output_dir)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_resolved_config(cfg, root, "finetune", out_dir)
    if not ft.enabled:
        done = pass_through(cfg, out_dir) if main else {"enabled": False}
        metrics = {"student": preset.name, **done, "wall_s": round(time.monotonic() - t0, 2)}
        return write_metrics(out_dir, metrics) if main else metrics
    chosen = [r for r in records if r["kind"] in ft.kinds]
    if not chosen:
        raise ConfigError(f"finetune.kinds={ft.kinds}: {ft.dataset_dir}/train.jsonl holds none of these "
                          f"({len(records)} records of other kinds)")
    # Held out before anything else, so every arm, sample and seed is scored on the same unseen exercises.
    chosen, heldout = heldout_split(chosen, ft.heldout_fraction, cfg.seed)
    if main:
        write_jsonl(ft.heldout_path, heldout)
    chosen = sample_records(chosen, ft.max_records, cfg.seed)
    chosen, arm = source_records(cfg, preset, chosen)
    student, init = phase_one_output(cfg, preset)
    metrics = train_adapter(ft, student, chosen, out_dir, cfg.seed + ft.seed, section="finetune", init_adapter=init,
                            progress=progress, callbacks=callbacks)
    metrics = {"student": preset.name, "enabled": True, "kinds": list(ft.kinds), "records_used": len(chosen),
               "heldout_records": len(heldout), "training_seed": cfg.seed + ft.seed, **arm,
               "phase_one": f"pretrain-{cfg.pretrain.mode}" if cfg.pretrain.enabled else None,
               **{k: v for k, v in metrics.items() if k != "student"},
               "wall_s": round(time.monotonic() - t0, 2)}
    return write_metrics(out_dir, metrics) if main else metrics


def write_metrics(out_dir: Path, metrics: dict) -> dict:
    """metrics.json through its model (a key the model does not know fails here, not in a reader); what it wrote."""
    model = FinetuneMetrics.parse(metrics, out_dir / "metrics.json")
    model.write(out_dir / "metrics.json")
    return model.dump()


def main(args) -> int:
    # A diverged run is a clear message and exit status 3, not a traceback; the checkpoints stay.
    with replica_stdout():
        return stage_cli(run_finetune, args, lambda m: {k: m.get(k) for k in ("steps", "train_loss", "eval_loss", "tokens_per_s", "peak_memory_mb")},
                         {TrainingDiverged: ("training diverged", 3)})
