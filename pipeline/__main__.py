"""`python -m pipeline generate ...` is the same as `textbook generate ...`."""

from .cli import main

raise SystemExit(main())
