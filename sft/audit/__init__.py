"""`lccc-sft audit`: certify a recipe or a trained run (labels, template, stop tokens, export); after `export`."""
