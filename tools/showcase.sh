#!/usr/bin/env bash
# The cpu-showcase run (issue 12): every stage of the pipeline with `profile=cpu-showcase`, its
# outputs under data/showcase/ and its report under eval/showcase/ (committed), beside the default
# run's. Each stage resumes where a killed run stopped (request caches, filter shards, training
# checkpoints), so running it again after a kill picks up the work.
#   tools/showcase.sh                  # about 2 hours on 2 cores from cold caches
#   tools/showcase.sh finetune         # from one stage on (the earlier ones' outputs are reused)
set -euo pipefail
cd "$(dirname "$0")/.."
export DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1
D=data/showcase
SET=(--set profile=cpu-showcase
     --set generate.output_dir=$D/generate
     --set filter.input_dir=$D/generate --set filter.output_dir=$D/filter
     --set dedupe.input_dir=$D/filter --set dedupe.output_dir=$D/dedupe
     --set decontaminate.input_dir=$D/dedupe --set decontaminate.output_dir=$D/decontaminate
     --set decontaminate.dataset_dir=$D/dataset --set decontaminate.card_path=eval/showcase/dataset_card.md
     --set pretrain.output_dir=$D/pretrain
     --set finetune.dataset_dir=$D/dataset --set finetune.output_dir=$D/finetune
     --set evaluate.output_dir=eval/showcase)
STAGES=(generate filter dedupe decontaminate pretrain finetune evaluate report)
start=${1:-generate}
run=0
for stage in "${STAGES[@]}"; do
  [[ $stage == "$start" ]] && run=1
  (( run )) || continue
  echo "== $stage ($(date +%H:%M:%S))"
  /usr/bin/time -f "== $stage took %e s" .venv/bin/textbook "$stage" -q "${SET[@]}"
done
