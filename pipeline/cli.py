"""The `textbook` command: one subcommand per stage.

    textbook generate --set generate.n_exercises=8
    textbook config            # print the resolved config
    textbook config --keys     # every key with its default and help text
"""

from __future__ import annotations

import argparse
import importlib
import sys

import yaml

from pipeline.core.config import ConfigError, RunConfig, describe, to_dict
from pipeline.core.records import RecordError
from pipeline.core.stage import add_common_arguments, load_stage_config

# stage name -> module with a `main(args) -> int`
STAGES = {
    "topics": "Grow the topic tree with the teacher (on demand, not a DVC stage); generate.topics_file uses it.",
    "generate": "Generate textbook sections and exercises with the teacher LLM.",
    "filter": "Keep exercises that parse and pass their own tests in the sandbox; textbooks whose code parses.",
    "dedupe": "Remove exact and near duplicates (MinHash LSH on code-aware shingles).",
    "decontaminate": "Remove records too close to HumanEval; write the final dataset and its card.",
    "controls": "Write a control arm's pool (the filter's rejects, or natural code) for dedupe and decontaminate.",
    "corpus": "Natural code filtered by an educational-value classifier: extract snippets, or (step select) "
              "annotate a sample with the teacher, train a random forest, keep the top-scored.",
    "pretrain": "Phase 1: next-token training on the textbook sections (LoRA, full, or a model from scratch).",
    "finetune": "Phase 2: QLoRA fine-tune the student (after phase 1, if on) on the curated exercises.",
    "evaluate": "HumanEval pass@k of the base, after-pretrain and fine-tuned student (and optionally the teacher).",
    "report": "Write eval/report.md and report.html against phi-1 and the published references.",
}


def _config_main(args: argparse.Namespace) -> int:
    if args.keys:
        for row in describe(RunConfig):  # from the sections' pydantic fields: type, default, bounds, help
            print(f"{row.key}: {row.type} = {row.default}" + (f"  ({row.bounds})" if row.bounds else ""))
            print(f"    {row.help}")
        return 0
    cfg, _ = load_stage_config(args)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="textbook", description="phi-1 'Textbooks Are All You Need' pipeline.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_common_arguments(p)
    p = sub.add_parser("config", help="Print the resolved config, or every key with --keys.")
    add_common_arguments(p)
    p.add_argument("--keys", action="store_true", help="List every config key with its default and help.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "config":
            return _config_main(args)
        module = importlib.import_module(f"pipeline.stages.{args.command}")
        return module.main(args)
    except (ConfigError, RecordError) as exc:
        print(f"textbook {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
