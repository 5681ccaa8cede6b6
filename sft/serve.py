"""`python -m sft.serve ...`, the form earlier versions documented: the same as `lccc-sft serve ...`."""

import sys

from sft.cli import main

if __name__ == "__main__":
    main(["serve", *sys.argv[1:]])  # through the CLI's wrapper: Ctrl-C while importing is one line too
