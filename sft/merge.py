"""`python -m sft.merge ...`, the form earlier versions documented: the same as `lccc-sft merge ...`."""

from sft.export.merge import main

if __name__ == "__main__":
    main()
