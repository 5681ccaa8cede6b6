"""`python -m sft.serve ...`, the form earlier versions documented: the same as `lccc-sft serve ...`."""

from sft.serving.server import main

if __name__ == "__main__":
    main()
