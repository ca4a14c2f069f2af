"""One module (or subpackage) per pipeline stage, each a pure core function plus a thin `main`.

A stage imports `pipeline.core`, `pipeline.engines` and `pipeline.sandbox`, never another stage
(an import-linter contract, `lint-imports`), so its dvc.yaml deps (those layers plus its own
module) cover everything it runs."""
