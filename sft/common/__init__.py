"""Pieces every stage shares: errors, safe writes, argument parsing, recipes, templates, models and loading runs."""
