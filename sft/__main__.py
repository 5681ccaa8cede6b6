"""`python -m sft COMMAND ...`: the same as `lccc-sft COMMAND ...`, with or without installing the project."""

from sft.cli import main

main()
