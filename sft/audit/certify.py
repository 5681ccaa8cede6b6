"""`lccc-sft audit --config recipe.yaml` or `--model_path <run>`: certify what a recipe trains, and what a run serves.

On the recipe's own prepared data (a run's: its saved `recipe.yaml`), through SFTTrainer's tokenization and labels
(`sft/train/audit.py`): loss on each reply and its end-of-turn token and nothing else, BOS right, truncations
counted and shown, the training template equal to the official one. For a run, the training template audited is the
one the run wrote (its `chat_template.jinja`), and also: the trained end-of-turn token is among
`generation_config.json`'s stop ids and, where the run was exported, the GGUF's template and end token and the
Modelfile's template and stops are the run's. Prints two samples with the supervised spans marked.
Any failure is listed (conversation, position, tokens) and the command exits with code 2.
"""

import json
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers.utils.hub import CHAT_TEMPLATE_FILE

from sft.common.arguments import parse_arguments
from sft.common.config import RECIPE_DATACLASSES, RECIPE_FILE, Recipe, check_values
from sft.common.errors import UserError, exits_cleanly_on_user_error
from sft.common.generation import GENERATION_CONFIG
from sft.common.inference import start_command_logging
from sft.common.model import check_model_source, load_tokenizer
from sft.common.template import training_template_kind
from sft.data import load_conversations
from sft.export.gguf import MODELFILE, gguf_end_tokens, ollama_format, read_gguf_metadata
from sft.train.audit import AuditReport, TrlPreparation, audit_samples, marked_sample, trl_labels

logger = logging.getLogger(__name__)
STOP_LINE = re.compile(r'^PARAMETER stop "(.*)"$', re.MULTILINE)
TEMPLATE_BLOCK = re.compile(r'^TEMPLATE """(.*?)"""$', re.MULTILINE | re.DOTALL)


@dataclass
class AuditArguments:
    """What to audit beside the recipe: a run's folder, how many samples, which split."""

    model_path: str | None = field(
        default=None,
        metadata={"help": "A training run's folder: its recipe, generation_config.json and GGUF export are audited."},
    )
    gguf_dir: str | None = field(default=None, metadata={"help": "The run's export (default: <model_path>-gguf)."})
    audit_samples: int = field(
        default=1000, metadata={"help": "Samples audited, from the start of the split (0: all)."}
    )
    split: str = field(default="train", metadata={"help": "Which split of the prepared data to audit."})


def parse_audit_command(argv: list[str]) -> tuple[Recipe, AuditArguments]:
    """A recipe (`--config`) or a run (`--model_path`, whose saved recipe is read), plus flags."""
    if "--model_path" in argv and "--config" not in argv:
        run = Path(argv[argv.index("--model_path") + 1])
        if not (run / RECIPE_FILE).is_file():
            raise UserError(f"{run} has no {RECIPE_FILE}: give the output folder of a training run")
        argv = ["--config", str(run / RECIPE_FILE), *argv]
    parsed = parse_arguments((*RECIPE_DATACLASSES, AuditArguments), argv, prog="lccc-sft audit")
    data, training, model, run_args, audit = parsed.values
    recipe = Recipe(data=data, training=training, model=model, run=run_args, resolved={})
    check_values(recipe)
    return recipe, audit


def stop_ids(config: dict) -> list[int]:
    ids = config.get("eos_token_id")
    return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)


def check_generation_config(run: Path, tokenizer) -> list[str]:
    """The end-of-turn token training supervises is one that generation stops at."""
    path = run / GENERATION_CONFIG
    if not path.is_file():
        return [f"{path} is missing: eval, chat and serve would not know where a reply stops"]
    ids = stop_ids(json.loads(path.read_text(encoding="utf-8")))
    if tokenizer.eos_token_id not in ids:
        return [f"{path}: stop ids {ids} lack the trained end-of-turn token {tokenizer.eos_token!r}"]
    return []


def check_modelfile(text: str, official: str, tokenizer) -> list[str]:
    """The Modelfile renders the official template's family format and stops on the trained end-of-turn token."""
    problems = []
    stops = STOP_LINE.findall(text)
    if tokenizer.eos_token not in stops:
        problems.append(f"Modelfile: stops {stops} lack the trained end-of-turn token {tokenizer.eos_token!r}")
    template = TEMPLATE_BLOCK.search(text)
    try:
        expected = ollama_format(official).template
    except UserError as err:
        return [*problems, f"Modelfile: {err}"]
    if not template or template.group(1) != expected:
        problems.append("Modelfile: its TEMPLATE is not the Ollama form of the model's official chat template")
    return problems


def check_gguf_metadata(metadata: dict, official: str, tokenizer, conversations: list[list[dict]]) -> list[str]:
    """The GGUF's chat template renders the official text, and its end (or end-of-turn) token is the trained
    end-of-turn token (`gguf_end_tokens`)."""
    problems = []
    named = gguf_end_tokens(metadata)
    if tokenizer.eos_token not in named:
        problems.append(
            f"GGUF: its end token is {named[0] if named else None!r}, not the trained {tokenizer.eos_token!r}"
        )
    template = metadata.get("tokenizer.chat_template")
    for index, messages in enumerate(conversations):
        rendered = tokenizer.apply_chat_template(messages, chat_template=template or "", tokenize=False)
        if rendered != tokenizer.apply_chat_template(messages, chat_template=official, tokenize=False):
            problems.append(f"GGUF: its chat template renders conversation {index} differently from the official one")
            break
    return problems


def check_export(gguf_dir: Path, official: str, tokenizer, conversations: list[list[dict]]) -> list[str]:
    """The GGUF's template metadata and the Modelfile agree with the run on text and stop token."""
    problems = []
    ggufs = sorted(gguf_dir.glob("*.gguf"))
    if not ggufs:
        problems.append(f"{gguf_dir} holds no .gguf file")
    for path in ggufs:
        problems += check_gguf_metadata(read_gguf_metadata(path), official, tokenizer, conversations)
    modelfile = gguf_dir / MODELFILE
    if modelfile.is_file():
        problems += check_modelfile(modelfile.read_text(encoding="utf-8"), official, tokenizer)
    return problems


def training_template_path(recipe: Recipe, args: AuditArguments) -> str | None:
    """The training template to audit: the one a run wrote with its tokenizer, else the recipe's (None: the one
    `load_tokenizer` gives the model, ours, TRL's or derived from the official template)."""
    written = Path(args.model_path or "") / CHAT_TEMPLATE_FILE
    return str(written) if args.model_path and written.is_file() else recipe.training.chat_template_path


def audit(recipe: Recipe, args: AuditArguments) -> AuditReport:
    check_model_source(recipe.model.model_name_or_path)
    template_path = training_template_path(recipe, args)
    tokenizer = load_tokenizer(
        recipe.model.model_name_or_path,
        revision=recipe.model.model_revision,
        trust_remote_code=recipe.training.trust_remote_code,
        chat_template_path=template_path,
    )
    print(
        f"training template: {training_template_kind(tokenizer.chat_template)} "
        f"({template_path or 'from ' + recipe.model.model_name_or_path})"
    )
    datasets = load_conversations(recipe.data, recipe.training.seed)
    if args.split not in datasets:
        raise UserError(f"the prepared data has no split {args.split!r}; it has {', '.join(datasets)}")
    dataset = datasets[args.split]
    if args.audit_samples:
        dataset = dataset.select(range(min(args.audit_samples, len(dataset))))
    preparer = TrlPreparation(tokenizer, recipe.training, dataset)
    samples = trl_labels(preparer, tokenizer, recipe.training, dataset)
    official = tokenizer.official_chat_template
    report = audit_samples(tokenizer, official, samples, recipe.training.max_length)
    if args.model_path:
        run = Path(args.model_path)
        report.failures += check_generation_config(run, tokenizer)
        gguf_dir = Path(args.gguf_dir or f"{str(run).rstrip('/')}-gguf")
        if gguf_dir.is_dir():
            conversations = [s.messages for s in samples[:50]]
            report.failures += check_export(gguf_dir, official or tokenizer.chat_template, tokenizer, conversations)
    for sample in samples[:2]:
        print(f"--- sample {sample.index}, supervised spans marked:\n{marked_sample(tokenizer, sample)}\n")
    print(f"truncated samples: {len(report.truncated)} of {report.samples} (max_length {recipe.training.max_length})")
    for line in report.truncated[:5]:
        print(f"  {line}")
    report.raise_on_failure()
    print(f"audit passed: {report.samples} samples of {args.split}, loss on each reply and its end-of-turn token only")
    return report


@exits_cleanly_on_user_error
def main(argv: list[str] | None = None) -> AuditReport:
    recipe, args = parse_audit_command(sys.argv[1:] if argv is None else argv)
    start_command_logging()
    return audit(recipe, args)


if __name__ == "__main__":
    main()
