"""Dialogues from any source -> cleaned chat samples for SFTTrainer, prepared once and cached.

Sources (`sources`, `files`, `json_stream`): the Hub (`thu-coai/lccc` through the Hub's parquet conversion, or any
dataset with a dialogue column) and local files: LCCC JSON (`{"train": [...], "valid": [...], "test": [...]}`), a
JSON list of dialogues, JSONL, text with one dialogue per line and tab-separated utterances (each of them
optionally gzip-compressed) and parquet. A dialogue is a list of utterances, or an object holding one; rows
already in chat form (`messages` of `role`/`content`) pass through untouched (`records`); alpaca and ShareGPT
records become chat messages (`formats`).

Records are kept as Arrow data on disk from the moment they are read, and cleaning (`clean`) runs as a `datasets`
map (with `num_proc` workers for large data) that also builds each dialogue's samples (`conversations`); after
deduplication and splitting (`pipeline`) an Arrow-only pass gives one row per sample. LCCC-large (12M dialogues)
is so prepared without holding it in memory. The result lives in `<processed_dir>/<name>-<key>/` (`cache`), where
the key hashes the data arguments, the seed, the source file and this package's code, and is reused while they
stay the same. Several sources are prepared so one by one, then mixed by weight or count (`mixture`).
`python -m sft.data` (`__main__`) prepares data alone and adds token statistics (`stats`) to the folder's
`stats.json`.
"""

from sft.data.cache import load_prepared, prepared_folder
from sft.data.clean import normalize_utterance
from sft.data.conversations import multi_turn_samples, per_turn_samples
from sft.data.mixture import held_out_by_source, load_conversations

__all__ = [
    "held_out_by_source",
    "load_conversations",
    "load_prepared",
    "multi_turn_samples",
    "normalize_utterance",
    "per_turn_samples",
    "prepared_folder",
]
