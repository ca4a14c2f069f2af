#!/usr/bin/env bash
# The cpu-showcase run: every stage of the pipeline with `profile=cpu-showcase`, its
# outputs under data/showcase/ and its report under eval/showcase/ (committed), beside the default
# run's. Each stage resumes where a killed run stopped (request caches, filter shards, training
# checkpoints), so running it again after a kill picks up the work.
# Steps: the stages in STAGES, with two of them several commands under data/showcase/:
#   controls  the ablation's rejected arm (pool, dedupe, decontaminate: CONTROLS in showcase_env.sh);
#   corpus    the natural-code corpus (dvc.yaml's four corpus stages: CORPUS in showcase_env.sh) under
#             data/showcase/corpus: unfiltered/ (the ablation's corpus arm) and select/kept.jsonl (its
#             corpus_filtered arm). Its annotation (corpus.annotate teacher ratings, then every snippet
#             embedded) is the slowest step. Only the ablation reads it: phase 1 (pretrain.extra_corpus)
#             and the dataset card still read the default run's data/corpus/select/.
#   tools/showcase.sh                  # 3-4 hours on 2 cores from cold caches (640 exercise prompts), plus
#                                      # the corpus: hours at its default scale (docs/corpus.md)
#   .venv/bin/python tools/ablation.py --data data/showcase --out eval/showcase/ablation \
#       --work data/showcase/ablation --set profile=cpu-showcase --set pretrain.enabled=false --phase1 \
#       --arms curated rejected natural corpus corpus_filtered
#   tools/showcase.sh finetune         # from one stage on (the earlier ones' outputs are reused)
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/showcase_env.sh  # its --set list (SET) and data folder (D)
STAGES=(generate filter dedupe decontaminate controls corpus pretrain finetune evaluate report)
start=${1:-generate}
run=0
for stage in "${STAGES[@]}"; do
  [[ $stage == "$start" ]] && run=1
  (( run )) || continue
  echo "== $stage ($(date +%H:%M:%S))"
  if [[ $stage == controls || $stage == corpus ]]; then  # the ablation's control arms (tools/ablation.py)
    if [[ $stage == controls ]]; then cmds=("${CONTROLS[@]}"); else cmds=("${CORPUS[@]}"); fi
    for cmd in "${cmds[@]}"; do
      # shellcheck disable=SC2086  # each entry is a word list
      /usr/bin/time -f "== $stage: ${cmd%% *} took %e s" .venv/bin/textbook ${cmd%% *} "${SET[@]}" ${cmd#* }
    done
    continue
  fi
  /usr/bin/time -f "== $stage took %e s" .venv/bin/textbook "$stage" -q "${SET[@]}"
done
