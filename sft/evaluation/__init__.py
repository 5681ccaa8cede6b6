"""Evaluation: held-out perplexity, generated replies and their metrics, the knowledge check and the report."""
