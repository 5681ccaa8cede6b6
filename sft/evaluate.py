"""Evaluate a trained adapter on the held-out LCCC test split, optionally side by side with its base model.

python -m sft.evaluate --model_path output/smoke [--compare_base] [--num_samples 100] [--no_quantize]
python sft/evaluate.py --model_path ./output/llama2-7b-chat-lccc

Measures perplexity over the assistant reply tokens only (the training loss masking), generates replies for test
contexts greedily and with the LCCC paper's nucleus sampling (p=0.9, temperature 0.7, seeded), scores them with
the paper's automatic metrics (character-level BLEU-2/BLEU-4, Distinct-1/2, average length) and writes
`eval_report.json`, `eval_report.md` and `loss_curves.png`.
"""

if __name__ == "__main__" and not __package__:
    # Started as a file (`python sft/evaluate.py`): Python would put sft/ first on the module path, where this
    # file hides Hugging Face's `evaluate` package; run it as the package's module instead.
    import os
    import sys

    os.execv(sys.executable, [sys.executable, "-m", "sft.evaluate", *sys.argv[1:]])

import dataclasses
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sft.cli import parse_arguments
from sft.errors import LOG_FORMAT, UserError, exits_cleanly_on_user_error
from sft.generation import GenerationArguments, generation_kwargs
from sft.inference import (
    TrainedModelArguments,
    default_device,
    encode_prompt,
    load_base,
    load_model,
    quantization_label,
    quiet_library_noise,
    read_run,
    render_prompt,
)

logger = logging.getLogger(__name__)

METRIC_KEYS = ("bleu_2", "bleu_4", "distinct_1", "distinct_2", "avg_len")
DECODINGS = ("sampling", "greedy")
HEADLINE_DECODING = "sampling"  # the LCCC paper scores replies decoded with nucleus sampling
METRIC_NAMES = {
    "perplexity": "perplexity (replies)",
    "bleu_2": "BLEU-2",
    "bleu_4": "BLEU-4",
    "distinct_1": "Distinct-1",
    "distinct_2": "Distinct-2",
    "avg_len": "avg reply length (chars)",
}


# --- The LCCC paper's automatic metrics, at character level. ---------------------------------------------------


def characters(text: str) -> list[str]:
    """A reply as the metrics see it: its characters, whitespace left out."""
    return [char for char in text if not char.isspace()]


def bleu(hypotheses: list[str], references: list[str], max_order: int) -> float:
    """Corpus BLEU-n (0-100) at character level: sacrebleu with its `char` tokenizer and default smoothing."""
    from sacrebleu.metrics import BLEU

    if not hypotheses:
        return 0.0
    return BLEU(tokenize="char", max_ngram_order=max_order).corpus_score(list(hypotheses), [list(references)]).score


def distinct(hypotheses: list[str], n: int) -> float:
    """Distinct-n (Li et al., 2016): distinct character n-grams / all character n-grams, over all replies."""
    grams = [tuple(chars[i : i + n]) for chars in map(characters, hypotheses) for i in range(len(chars) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def average_length(hypotheses: list[str]) -> float:
    return sum(len(characters(h)) for h in hypotheses) / len(hypotheses) if hypotheses else 0.0


def reply_metrics(hypotheses: list[str], references: list[str]) -> dict:
    return {
        "bleu_2": bleu(hypotheses, references, 2),
        "bleu_4": bleu(hypotheses, references, 4),
        "distinct_1": distinct(hypotheses, 1),
        "distinct_2": distinct(hypotheses, 2),
        "avg_len": average_length(hypotheses),
    }


# --- Perplexity and generation. ---------------------------------------------------------------------------------


def model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def reply_perplexity(
    model, tokenizer, conversations: list[list[dict]], max_length: int, batch_size: int, last_reply_only=False
) -> dict:
    """exp(mean token cross-entropy) over the assistant reply tokens (and their `</s>`), as masked in training.

    With `last_reply_only` (prompt/completion samples) only the final reply counts, as in training.
    """
    device = model_device(model)
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(conversations), batch_size):
        encoded = [
            tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
            for messages in conversations[start : start + batch_size]
        ]
        ids = [e["input_ids"][:max_length] for e in encoded]
        masks = [e["assistant_masks"][:max_length] for e in encoded]
        if last_reply_only:
            prompts = conversations[start : start + batch_size]
            starts = [len(encode_prompt(tokenizer, render_prompt(tokenizer, m[:-1]))["input_ids"]) for m in prompts]
            masks = [[0] * min(begin, len(mask)) + mask[begin:] for begin, mask in zip(starts, masks, strict=True)]
        width = max(map(len, ids))
        input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        reply = torch.zeros_like(input_ids)
        for row, (tokens, mask) in enumerate(zip(ids, masks, strict=True)):
            input_ids[row, : len(tokens)] = torch.tensor(tokens)
            attention[row, : len(tokens)] = 1
            reply[row, : len(mask)] = torch.tensor(mask)
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits.float()
        targets = input_ids[:, 1:].to(device)
        counted = (reply[:, 1:] * attention[:, 1:]).bool().to(device)
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
        total_nll += nll[counted].sum().item()
        total_tokens += int(counted.sum())
    if not total_tokens:
        raise UserError("the test conversations hold no reply tokens to measure perplexity on")
    mean = total_nll / total_tokens
    return {"perplexity": math.exp(mean), "reply_loss": mean, "reply_tokens": total_tokens}


@torch.no_grad()
def generate_replies(
    model, tokenizer, contexts: list[list[dict]], generation: GenerationArguments, batch_size: int, sample: bool
) -> list[str]:
    """Replies for each context, in batches with left padding, stopping at the end of the turn; sampling seeded."""
    from transformers import set_seed

    device = model_device(model)
    kwargs = generation_kwargs(tokenizer, generation, sample)
    tokenizer.padding_side = "left"
    set_seed(generation.seed)
    replies = []
    for start in range(0, len(contexts), batch_size):
        prompts = [render_prompt(tokenizer, messages) for messages in contexts[start : start + batch_size]]
        batch = encode_prompt(tokenizer, prompts, padding=True, return_tensors="pt").to(device)
        output = model.generate(**batch, **kwargs)
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        replies += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return replies


def evaluate_model(
    model, tokenizer, conversations, contexts, references, settings: dict, generation: GenerationArguments, label: str
) -> dict:
    logger.info("%s: perplexity over the replies of %d test conversations", label, len(conversations))
    perplexity = reply_perplexity(
        model, tokenizer, conversations, settings["max_length"], settings["batch_size"], settings["last_reply_only"]
    )
    replies, scores = {}, {}
    for decoding in DECODINGS:
        logger.info("%s: generating %d replies (%s)", label, len(contexts), decoding)
        replies[decoding] = generate_replies(
            model, tokenizer, contexts, generation, settings["batch_size"], sample=decoding == "sampling"
        )
        scores[decoding] = reply_metrics(replies[decoding], references)
    metrics = {"perplexity": perplexity.pop("perplexity"), **scores[HEADLINE_DECODING], **perplexity, **scores}
    return {"metrics": metrics, "replies": replies}


# --- The report. ------------------------------------------------------------------------------------------------


def format_value(key: str, value: float) -> str:
    digits = {"perplexity": 2, "bleu_2": 2, "bleu_4": 2, "avg_len": 1}.get(key, 4)
    return f"{value:.{digits}f}"


def metric_rows(report: dict) -> list[list[str]]:
    """One row per metric and decoding: name, fine-tuned value, and the base value when compared."""
    rows = [(METRIC_NAMES["perplexity"], "perplexity", None)]
    for decoding in DECODINGS:
        rows += [(f"{METRIC_NAMES[key]}, {decoding}", key, decoding) for key in METRIC_KEYS]
    blocks = [report, report["base"]] if report.get("base") else [report]
    return [
        [name, *(format_value(key, (block if decoding is None else block[decoding])[key]) for block in blocks)]
        for name, key, decoding in rows
    ]


def metrics_table(report: dict) -> str:
    header = ["metric", "fine-tuned", "base"] if report.get("base") else ["metric", "value"]
    lines = [header, ["---"] + ["---:"] * (len(header) - 1), *metric_rows(report)]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def show_context(messages: list[dict]) -> str:
    return " / ".join(f"{m['role']}: {m['content']}" for m in messages if m["role"] != "system") or "(empty)"


def markdown_report(report: dict, num_examples: int) -> str:
    settings = report["settings"]
    compared = "base" in report
    lines = [
        f"# Evaluation of `{report['model_path']}`",
        "",
        f"Base model `{report['base_model']}` (quantization: {settings['quantization']}), held-out "
        f"`{settings['split']}` split of `{settings['dataset_name']}`: perplexity over the "
        f"{'last reply' if settings['last_reply_only'] else 'replies'} of {settings['ppl_conversations']} "
        f"conversations ({report['reply_tokens']} reply tokens), reply metrics "
        f"on {settings['num_samples']} contexts, at most {settings['max_new_tokens']} new tokens, greedy and "
        f"nucleus sampling (top_p {settings['top_p']}, temperature {settings['temperature']}, seed "
        f"{settings['seed']}).",
        "",
        "BLEU is sacrebleu's corpus BLEU at character level (0-100); Distinct-n is distinct/all character n-grams "
        "over all replies; the headline metrics in `eval_report.json` are those of the sampled replies, as in the "
        "LCCC paper.",
        "",
        metrics_table(report),
        "",
    ]
    if report.get("loss_curves"):
        lines += [f"![training and eval loss]({Path(report['loss_curves']).name})", ""]
    if report["samples"] and num_examples:
        lines += ["## Examples", ""]
    for i, sample in enumerate(report["samples"][:num_examples], 1):
        lines += [f"### {i}. {show_context(sample['context'])}", "", f"- reference: {sample['reference']}"]
        replies = [("fine-tuned, greedy", "greedy"), ("fine-tuned, sampled", "sampled")]
        if compared:
            replies += [("base, greedy", "base_greedy"), ("base, sampled", "base_sampled")]
        lines += [f"- {name}: {sample[key] or '(empty)'}" for name, key in replies]
        lines.append("")
    return "\n".join(lines)


def plot_loss_curves(trainer_state: Path, output: Path) -> Path | None:
    """Training and eval loss per step from `trainer_state.json`'s log history, as a PNG."""
    if not trainer_state.is_file():
        logger.info("no %s: no loss curves drawn", trainer_state.name)
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = json.loads(trainer_state.read_text(encoding="utf-8")).get("log_history", [])
    train = [(e["step"], e["loss"]) for e in history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e and "step" in e]
    if not train and not evals:
        logger.info("%s logs no loss: no loss curves drawn", trainer_state)
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="training loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"Loss curves: {trainer_state.parent.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(output)
    plt.close(fig)
    return output


# --- The command. -----------------------------------------------------------------------------------------------


@dataclass
class EvalArguments:
    """What to evaluate on, how much of it, and where the report goes."""

    output_dir: str | None = field(
        default=None, metadata={"help": "Where the report goes (default: the model folder)."}
    )
    compare_base: bool = field(default=False, metadata={"help": "Also evaluate the base model, side by side."})
    dataset_name: str | None = field(
        default=None, metadata={"help": "Evaluate on this LCCC file or Hub id instead of the recipe's data."}
    )
    split: str = field(default="test", metadata={"help": "Held-out split to evaluate on."})
    num_samples: int = field(default=100, metadata={"help": "Test contexts to generate replies for."})
    max_ppl_samples: int | None = field(
        default=None, metadata={"help": "At most this many conversations for perplexity."}
    )
    batch_size: int = field(default=8, metadata={"help": "Conversations per forward pass or generate call."})
    num_examples: int = field(default=5, metadata={"help": "Example replies shown in eval_report.md."})

    def __post_init__(self):
        if self.num_samples < 0 or self.num_examples < 0:
            raise UserError("--num_samples and --num_examples must be at least 0")
        if self.batch_size < 1:
            raise UserError("--batch_size must be positive")


def parse_args(argv: list[str]) -> tuple[TrainedModelArguments, EvalArguments, GenerationArguments]:
    return parse_arguments(
        (TrainedModelArguments, EvalArguments, GenerationArguments), argv, prog="python -m sft.evaluate"
    ).values


def row_messages(row: dict) -> tuple[list[dict], bool]:
    """A prepared sample as one message list, and whether only its last reply carried loss in training.

    Multi-turn samples (`messages`) train on every reply; prompt/completion samples only on the completion.
    """
    if row.get("messages"):
        return list(row["messages"]), False
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, list) and isinstance(completion, list) and completion:
        return [*prompt, *completion], True
    raise UserError(f"cannot evaluate samples with the fields {sorted(row)}: expected chat `messages`")


def held_out_conversations(run, args) -> tuple[list[list[dict]], bool, str, dict]:
    """The held-out split as the data step prepares it: message lists, last-reply-only flag, data name, and a
    mixture's message lists per source."""
    from sft.config import DataArguments
    from sft.data import held_out_by_source, load_conversations
    from sft.inference import resolve_local

    data = run.data
    if args.dataset_name:
        data = data or DataArguments()
        data.dataset_name = resolve_local(args.dataset_name)
    if data is None:
        raise UserError(
            f"{run.model_path} has no recipe.yaml naming the training data; give the data with --dataset_name"
        )
    splits = load_conversations(data, run.seed)
    if args.split not in splits or not len(splits[args.split]):
        raise UserError(f"{data.dataset_name} has no `{args.split}` conversations to evaluate on")
    rows = [row_messages(row) for row in splits[args.split]]
    conversations = [messages for messages, _ in rows if messages and messages[-1]["role"] == "assistant"]
    if not conversations:
        raise UserError(f"the `{args.split}` split of {data.dataset_name} holds no replies to evaluate on")
    by_source = held_out_by_source(splits, args.split) or {}
    by_source = {label: [row_messages(row)[0] for row in ds] for label, ds in by_source.items() if len(ds)}
    return conversations, rows[0][1], data.dataset_name or "the mixture", by_source


def evaluate(where: TrainedModelArguments, args: EvalArguments, generation: GenerationArguments) -> dict:
    run = read_run(where.model_path, where.base_model)
    if args.compare_base and not run.base_model:
        raise UserError(f"--compare_base: {where.model_path} does not say which base it came from; give --base_model")
    conversations, last_reply_only, dataset_name, by_source = held_out_conversations(run, args)
    ppl_conversations = conversations[: args.max_ppl_samples]
    generated = conversations[: args.num_samples]
    contexts = [messages[:-1] for messages in generated]
    references = [messages[-1]["content"] for messages in generated]
    device = where.device or default_device()
    quantize = where.quantize
    generation = dataclasses.replace(generation, seed=run.seed if generation.seed is None else generation.seed)
    settings = {
        "split": args.split,
        "dataset_name": dataset_name,
        "ppl_conversations": len(ppl_conversations),
        "num_samples": len(contexts),
        **{key: value for key, value in dataclasses.asdict(generation).items() if key != "do_sample"},
        "batch_size": args.batch_size,
        "max_length": run.max_length,
        "last_reply_only": last_reply_only,
        "quantization": quantization_label(run, quantize),
        "dtype": str(run.model_args.dtype) if run.is_adapter else "as saved",
        "device": device,
        "headline_decoding": HEADLINE_DECODING,
        "bleu": "sacrebleu corpus BLEU, character tokenizer, exp smoothing, 0-100",
        "distinct": "distinct / all character n-grams over all replies",
    }

    tokenizer = run.load_tokenizer(reply_mask=True)
    model = load_model(run, quantize=quantize, device=device)
    tuned = evaluate_model(
        model, tokenizer, ppl_conversations, contexts, references, settings, generation, "fine-tuned"
    )
    if by_source:  # a mixture: each source's replies on their own
        tuned["metrics"]["perplexity_by_source"] = {
            label: reply_perplexity(
                model, tokenizer, source[: args.max_ppl_samples], run.max_length, args.batch_size, last_reply_only
            )["perplexity"]
            for label, source in by_source.items()
        }
    base = None
    if args.compare_base:
        if run.is_adapter:
            with model.disable_adapter():
                base = evaluate_model(
                    model, tokenizer, ppl_conversations, contexts, references, settings, generation, "base"
                )
        else:  # a merged model: load the base it came from, unquantized like the merged weights
            del model
            base_model = load_base(run, quantize=False, device=device).eval()
            base = evaluate_model(
                base_model, tokenizer, ppl_conversations, contexts, references, settings, generation, "base"
            )

    samples = []
    for i, (context, reference) in enumerate(zip(contexts, references, strict=True)):
        sample = {"context": context, "reference": reference}
        sample.update(greedy=tuned["replies"]["greedy"][i], sampled=tuned["replies"]["sampling"][i])
        if base:
            sample.update(base_greedy=base["replies"]["greedy"][i], base_sampled=base["replies"]["sampling"][i])
        samples.append(sample)

    output_dir = Path(args.output_dir or run.model_path)
    output_dir.mkdir(parents=True, exist_ok=True)
    curves = plot_loss_curves(run.model_path / "trainer_state.json", output_dir / "loss_curves.png")
    report = {
        "model_path": str(run.model_path),
        "base_model": run.base_model,
        **tuned["metrics"],
        "base": base["metrics"] if base else None,
        "settings": settings,
        "loss_curves": str(curves) if curves else None,
        "samples": samples,
    }
    if not base:
        del report["base"]
    (output_dir / "eval_report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
    (output_dir / "eval_report.md").write_text(markdown_report(report, args.num_examples), encoding="utf-8")
    logger.info("wrote %s and %s", output_dir / "eval_report.json", output_dir / "eval_report.md")
    return report


@exits_cleanly_on_user_error
def main(argv: list[str] | None = None) -> dict:
    where, args, generation = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format=LOG_FORMAT, level=logging.INFO)
    quiet_library_noise()
    report = evaluate(where, args, generation)
    print(metrics_table(report))
    return report


if __name__ == "__main__":
    main()
