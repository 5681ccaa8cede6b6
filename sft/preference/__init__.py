"""After SFT: preference tuning (DPO, or ORPO) of a finished run's adapter, on pairs mined from its own failures.

`config` reads a preference recipe (one that names `sft_run:`), `mining` builds pairs from the corpus and the SFT
model's replies, `pair_files` reads users' own pairs, `trainer` trains with TRL's DPOTrainer (the SFT adapter is
its own reference: one 4-bit base in memory) and `launch` runs it through the SFT launcher's plan, resume, lock
and summary.
"""
