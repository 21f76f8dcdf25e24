"""Evaluation: lm-evaluation-harness over local files, perplexity, the comparison report."""
