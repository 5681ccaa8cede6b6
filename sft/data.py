"""LCCC dialogues -> chat conversations (`{"messages": [{"role", "content"}, ...]}`) for SFTTrainer."""

import itertools
import json
import re
from pathlib import Path

from datasets import Dataset, DatasetDict

from sft.config import DataArguments
from sft.errors import UserError

LCCC_HUB_ID = "thu-coai/lccc"
# LCCC's own split names -> the names the rest of the project uses.
SPLIT_NAMES = {"train": "train", "valid": "validation", "validation": "validation", "dev": "validation", "test": "test"}
_LATIN_OR_DIGIT = re.compile(r"[A-Za-z0-9]")


def normalize_utterance(text: str) -> str:
    """Undo LCCC's segmentation spaces: "你 好 啊 ！" -> "你好啊！", "2 1 万" -> "21万", "S E E D" -> "SEED".

    A space survives only between two Latin/digit words at least one of which is longer than one character,
    so "I love you" and "iPhone 12" keep theirs; segmented single letters and digits are joined again.
    """
    pieces = text.split()
    if not pieces:
        return ""
    out = [pieces[0]]
    for prev, piece in itertools.pairwise(pieces):
        latin_pair = _LATIN_OR_DIGIT.fullmatch(prev[-1]) and _LATIN_OR_DIGIT.fullmatch(piece[0])
        if latin_pair and (len(prev) > 1 or len(piece) > 1):
            out.append(" ")
        out.append(piece)
    return "".join(out)


def dialogue_to_samples(utterances: list[str], max_turns: int, system_prompt: str | None = None) -> list[dict]:
    """Cut one dialogue into chat samples of at most `max_turns` turns, every reply a target exactly once.

    A turn is one user message and the reply to it; speakers alternate and the first speaker is the user. A
    last message without a reply is not a turn and is left out.
    """
    turns = [(utterances[i], utterances[i + 1]) for i in range(0, len(utterances) - 1, 2)]
    samples = []
    for start in range(0, len(turns), max_turns):
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        for user, assistant in turns[start : start + max_turns]:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        samples.append({"messages": messages})
    return samples


def read_lccc_json(path: Path) -> dict[str, list[list[str]]]:
    """Read an LCCC JSON file `{"train": [...], "valid": [...], "test": [...]}` of utterance lists."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(raw, dict) or not any(key in SPLIT_NAMES for key in raw):
        raise UserError(f"{path} is not an LCCC file: expected an object with train/valid/test lists of dialogues")
    return {SPLIT_NAMES[key]: dialogues for key, dialogues in raw.items() if key in SPLIT_NAMES}


def read_hub_dialogues(name: str, config: str | None) -> dict[str, list[list[str]]]:
    """Load a Hub dialogue dataset; LCCC is read from the Hub's parquet conversion of its loading script."""
    from datasets import load_dataset

    revision = "refs/convert/parquet" if name == LCCC_HUB_ID else None
    loaded = load_dataset(name, config, revision=revision)
    return {SPLIT_NAMES.get(split, split): list(ds["dialog"]) for split, ds in loaded.items()}


def read_dialogues(args: DataArguments) -> dict[str, list[list[str]]]:
    if not args.dataset_name:
        raise UserError("no data given: set `dataset_name` to a local LCCC file or a Hub dataset id")
    path = Path(args.dataset_name)
    if path.exists():
        return read_lccc_json(path)
    if args.dataset_name.count("/") != 1 or args.dataset_name.startswith((".", "/")):
        raise UserError(f"dataset not found: {args.dataset_name} is neither a local file nor a Hub dataset id")
    return read_hub_dialogues(args.dataset_name, args.dataset_config)


def conversations(dialogues: list[list[str]], args: DataArguments) -> list[dict]:
    samples = []
    for dialogue in dialogues:
        utterances = [normalize_utterance(u) for u in dialogue if isinstance(u, str)]
        utterances = [u for u in utterances if u]
        samples += dialogue_to_samples(utterances, args.max_turns, args.system_prompt)
    return samples


def load_conversations(args: DataArguments, seed: int) -> DatasetDict:
    """Train/validation/test chat datasets; a validation split is carved from train when the data has none."""
    splits = read_dialogues(args)
    if "train" not in splits:
        raise UserError(f"{args.dataset_name} has no train split")
    if "validation" not in splits and args.val_size > 0:
        carved = Dataset.from_dict({"dialog": splits["train"]}).train_test_split(test_size=args.val_size, seed=seed)
        splits["train"], splits["validation"] = carved["train"]["dialog"], carved["test"]["dialog"]
    limits = {"train": args.max_train_samples, "validation": args.max_eval_samples}
    out = DatasetDict()
    for split, dialogues in splits.items():
        samples = conversations(dialogues, args)[: limits.get(split)]
        if split == "train" and not samples:
            raise UserError(f"no training conversations in {args.dataset_name}: every dialogue was empty")
        out[split] = Dataset.from_list(samples)
    return out
