#!/usr/bin/env bash
# The cpu-showcase run: every stage of the pipeline with `profile=cpu-showcase`, its
# outputs under data/showcase/ and its report under eval/showcase/ (committed), beside the default
# run's. Each stage resumes where a killed run stopped (request caches, filter shards, training
# checkpoints), so running it again after a kill picks up the work.
#   tools/showcase.sh                  # about 2 hours on 2 cores from cold caches
#   tools/showcase.sh finetune         # from one stage on (the earlier ones' outputs are reused)
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/showcase_env.sh  # its --set list (SET) and data folder (D)
STAGES=(generate filter dedupe decontaminate pretrain finetune evaluate report)
start=${1:-generate}
run=0
for stage in "${STAGES[@]}"; do
  [[ $stage == "$start" ]] && run=1
  (( run )) || continue
  echo "== $stage ($(date +%H:%M:%S))"
  /usr/bin/time -f "== $stage took %e s" .venv/bin/textbook "$stage" -q "${SET[@]}"
done
