"""`python -m sft.chat ...`, the form earlier versions documented: the same as `lccc-sft chat ...`."""

from sft.serving.chat import main

if __name__ == "__main__":
    main()
