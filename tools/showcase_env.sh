# Shared by tools/showcase.sh and tools/curve.sh: the cpu-showcase profile, its data under
# data/showcase/ and its reports under eval/showcase/. Sourced, not run.
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
     --set controls.output_dir=$D/controls --set controls.rejected_input=$D/filter/rejected.jsonl
     --set finetune.rejected_dir=$D/controls/rejected/dataset
     --set finetune.corpus_dir=$D/corpus/unfiltered --set finetune.corpus_kept=$D/corpus/select/kept.jsonl
     --set evaluate.output_dir=eval/showcase)
# The rejected control arm (dvc.yaml's controls_rejected* stages) under $D: its pool, then the same
# dedupe and decontaminate as the dataset. Each entry is one command's --set list after "textbook".
R=$D/controls/rejected
CONTROLS=("controls -q --set controls.arm=rejected"
          "dedupe -q --set dedupe.input_dir=$R/pool --set dedupe.output_dir=$R/dedupe"
          "decontaminate -q --set decontaminate.input_dir=$R/dedupe --set decontaminate.output_dir=$R/decontaminate
           --set decontaminate.dataset_dir=$R/dataset --set decontaminate.card_path=$R/card.md
           --set dedupe.output_dir=$R/dedupe --set decontaminate.card_corpus=false")
# The natural-code corpus (dvc.yaml's corpus_extract, dedupe_corpus, decontaminate_corpus and corpus
# stages) under $D/corpus, for the ablation's corpus and corpus_filtered arms: snippets, the same dedupe
# and decontaminate as the dataset (text signals only), then the teacher's ratings, the classifier and
# the kept snippets. Each entry is one command's --set list after "textbook", as CONTROLS.
C=$D/corpus
CSET="--set corpus.pool_dir=$C/pool --set corpus.input_dir=$C/decontaminate --set corpus.output_dir=$C/select
      --set corpus.work_dir=$C/work"
CORPUS=("corpus -q --set corpus.step=extract $CSET"
        "dedupe -q --set dedupe.input_dir=$C/pool --set dedupe.output_dir=$C/dedupe"
        "decontaminate -q --set decontaminate.input_dir=$C/dedupe --set decontaminate.output_dir=$C/decontaminate
         --set decontaminate.dataset_dir=$C/unfiltered --set decontaminate.card_path=$C/unfiltered_card.md
         --set dedupe.output_dir=$C/dedupe --set decontaminate.functional=false --set decontaminate.card_corpus=false"
        "corpus -q --set corpus.step=select $CSET")
