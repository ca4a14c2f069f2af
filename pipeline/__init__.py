"""phi-1 "Textbooks Are All You Need" pipeline: generate, curate, fine-tune, evaluate, report."""
