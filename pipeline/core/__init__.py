"""The bottom layer: typed config, records and their one schema, HumanEval's data, stage helpers,
metrics. Imports nothing else of the package (checked by import-linter: `lint-imports`)."""
