"""`python -m sft.chat ...`, the form earlier versions documented: the same as `lccc-sft chat ...`."""

import sys

from sft.cli import main

if __name__ == "__main__":
    main(["chat", *sys.argv[1:]])  # through the CLI's wrapper: Ctrl-C while importing is one line too
