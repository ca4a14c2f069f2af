"""`python -m pipeline generate ...` is the same as `textbook generate ...`."""

from pipeline.cli import main

raise SystemExit(main())
