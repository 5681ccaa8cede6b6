"""`python -m sft.export_gguf ...`, the form earlier versions documented: the same as `lccc-sft export-gguf ...`."""

import sys

from sft.cli import main

if __name__ == "__main__":
    main(["export-gguf", *sys.argv[1:]])  # through the CLI's wrapper: Ctrl-C while importing is one line too
