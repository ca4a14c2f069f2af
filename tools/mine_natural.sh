#!/usr/bin/env bash
# The natural control arm, mined once and committed (data/controls/natural/train.jsonl): documented
# top-level functions of this Python's standard library as exercises (`textbook controls`), deduped
# and decontaminated by the same stages as the curated data. Committed so that every machine trains
# the same arm whatever its Python; manifest.json says where and when it was mined.
#   tools/mine_natural.sh          # a few minutes on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
export DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1
OUT=data/controls/natural
W=$OUT/work
T=.venv/bin/textbook
rm -rf "$W"
$T controls -q --set controls.arm=natural --set controls.output_dir="$W"
$T dedupe -q --set dedupe.input_dir="$W/natural/pool" --set dedupe.output_dir="$W/dedupe"
$T decontaminate -q --set decontaminate.input_dir="$W/dedupe" --set decontaminate.output_dir="$W/decontaminate" \
  --set decontaminate.dataset_dir="$W/dataset" --set decontaminate.card_path="$W/card.md" \
  --set dedupe.output_dir="$W/dedupe"
cp "$W/dataset/train.jsonl" "$OUT/train.jsonl"
.venv/bin/python - "$W" "$OUT" <<'PY'
import json, platform, sys
from pathlib import Path
from pipeline.core.records import sha256_file, write_json
work, out = Path(sys.argv[1]), Path(sys.argv[2])
pool = json.loads((work / "natural/pool/stats.json").read_text())
dedupe = json.loads((work / "dedupe/stats.json").read_text())
decon = json.loads((work / "decontaminate/stats.json").read_text())
write_json(out / "manifest.json", {
    "python": platform.python_version(), "roots": pool["roots"], "files": pool["files"],
    "functions_found": pool["functions_found"], "sampled": pool["sampled"],
    "after_dedupe": dedupe["kept"] if "kept" in dedupe else dedupe,
    "after_decontaminate": decon["kept"], "removed_by_signal": decon["removed_by_signal"],
    "removed_task_ids": decon["removed_task_ids"], "train_jsonl_sha256": sha256_file(out / "train.jsonl")})
PY
rm -rf "$W"
cat "$OUT/manifest.json"
