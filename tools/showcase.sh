#!/usr/bin/env bash
# The cpu-showcase run: every stage of the pipeline with `profile=cpu-showcase`, its
# outputs under data/showcase/ and its report under eval/showcase/ (committed), beside the default
# run's. Each stage resumes where a killed run stopped (request caches, filter shards, training
# checkpoints), so running it again after a kill picks up the work.
#   tools/showcase.sh                  # 3-4 hours on 2 cores from cold caches (640 exercise prompts)
#   .venv/bin/python tools/ablation.py --data data/showcase --out eval/showcase/ablation \
#       --work data/showcase/ablation --set profile=cpu-showcase --set pretrain.enabled=false --phase1
#   tools/showcase.sh finetune         # from one stage on (the earlier ones' outputs are reused)
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/showcase_env.sh  # its --set list (SET) and data folder (D)
STAGES=(generate filter dedupe decontaminate controls pretrain finetune evaluate report)
start=${1:-generate}
run=0
for stage in "${STAGES[@]}"; do
  [[ $stage == "$start" ]] && run=1
  (( run )) || continue
  echo "== $stage ($(date +%H:%M:%S))"
  if [[ $stage == controls ]]; then  # the rejected arm of the ablation (tools/ablation.py)
    for cmd in "${CONTROLS[@]}"; do
      # shellcheck disable=SC2086  # each entry is a word list
      .venv/bin/textbook ${cmd%% *} "${SET[@]}" ${cmd#* }
    done
    continue
  fi
  /usr/bin/time -f "== $stage took %e s" .venv/bin/textbook "$stage" -q "${SET[@]}"
done
