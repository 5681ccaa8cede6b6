"""`python -m sft.export_gguf ...`, the form earlier versions documented: the same as `lccc-sft export-gguf ...`."""

from sft.export.gguf import main

if __name__ == "__main__":
    main()
