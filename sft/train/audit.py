"""The label audit: on real samples, the loss falls on each reply and its end-of-turn token and on nothing else.

Labels come from SFTTrainer's own dataset preparation (`_prepare_dataset`: TRL's tokenization and its labels from
the assistant masks), so what is checked is what trains. The checks, per conversation:
- the training template without its `{% generation %}` markers renders the model's official template exactly;
- for a training template derived from the official one (`derive_training_template`), the supervised tokens are the
  spans derived by rendering growing prefixes of the conversation with the official template;
- the tokens are the official text's tokens: BOS tokens as many, and where, as the official text has them (for a
  template without markers, whose spans training derives, plus an end-of-turn token after a final reply the
  template leaves open);
- each supervised stretch is one reply: its content and the end-of-turn token, nothing before (role headers) or
  after (the next turn's header, padding); as many stretches as replies to learn;
- samples longer than `max_length` are counted and shown (which reply the cut falls in).
Training runs them on a few dozen samples before the first step (`audit_before_training`); `lccc-sft audit` runs
them on a recipe's prepared data and adds a run's stop tokens and export (`sft/audit/`).
"""

import copy
import sys
from dataclasses import dataclass, field

from datasets import Dataset
from trl import SFTTrainer
from trl.chat_template_utils import has_generation_markers

from sft.common.errors import UserError
from sft.common.template import (
    first_difference,
    is_derived_training_template,
    span_difference,
    strip_generation_markers,
    template_difference,
    with_derived_reply_masks,
)

TRAINING_AUDIT_SAMPLES = 32  # audited before the first step: seconds, even on a CPU
IGNORED = -100


@dataclass
class Labelled:
    """One audited sample: its messages, which assistant messages carry loss, and TRL's tokens and labels."""

    index: int
    messages: list[dict]
    replies: list[str]  # the contents that must be supervised, in order
    input_ids: list[int]
    labels: list[int]
    first: int = 0  # the first message whose replies are supervised (a prompt/completion sample's completion)


@dataclass
class AuditReport:
    """What the audit found: failures (each names a conversation, a position and the tokens) and truncations."""

    samples: int = 0
    failures: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)

    def raise_on_failure(self) -> None:
        if self.failures:
            shown = "\n".join(f"  - {failure}" for failure in self.failures[:10])
            more = f"\n  ... and {len(self.failures) - 10} more" if len(self.failures) > 10 else ""
            raise UserError(f"label audit failed on {len(self.failures)} check(s):\n{shown}{more}")


class TrlPreparation:
    """SFTTrainer's dataset preparation without loading a model: the three attributes `_prepare_dataset` reads.

    `load_tokenizer` has already put a template with `{% generation %}` markers on the tokenizer, so SFTTrainer's
    own `chat_template` would be None too; `completion_only_loss` follows SFTTrainer's rule (prompt/completion
    samples, unless the recipe says otherwise).
    """

    _prepare_dataset = SFTTrainer._prepare_dataset

    def __init__(self, tokenizer, args, dataset: Dataset):
        self._tokenizer = tokenizer
        self.chat_template = None
        auto = {"prompt", "completion"} <= set(dataset.column_names)
        self.completion_only_loss = auto if args.completion_only_loss is None else args.completion_only_loss


def whole_sample_args(args):
    """The recipe's training arguments, but one untruncated, unpacked, unshuffled sample per row."""
    args = copy.copy(args)
    args.max_length, args.packing, args.padding_free, args.shuffle_dataset = None, False, False, False
    args.dataset_num_proc = None
    return args


def trl_labels(preparer, tokenizer, args, dataset: Dataset) -> list[Labelled]:
    """Tokenize and label `dataset` through SFTTrainer's preparation (`preparer`: a trainer or `TrlPreparation`)."""
    if args.assistant_only_loss:  # as training does for a template without markers
        dataset = with_derived_reply_masks(tokenizer, dataset)
    prepared = preparer._prepare_dataset(dataset, tokenizer, whole_sample_args(args), False, None, "audit")
    samples = []
    for index, (row, out) in enumerate(zip(dataset, prepared, strict=True)):
        if "messages" in row:
            messages, first = row["messages"], 0
        else:
            messages, first = row["prompt"] + row["completion"], len(row["prompt"])
        replies = [m["content"] for m in messages[first:] if m["role"] == "assistant"]
        samples.append(Labelled(index, messages, replies, out["input_ids"], out["labels"], first))
    return samples


def supervised_runs(labels: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each stretch of labels that carries loss."""
    runs, start = [], None
    for i, label in enumerate([*labels, IGNORED]):
        if label != IGNORED and start is None:
            start = i
        elif label == IGNORED and start is not None:
            runs.append((start, i))
            start = None
    return runs


def show_tokens(tokenizer, ids: list[int], start: int, end: int) -> str:
    """Tokens `start..end` as the tokenizer spells them, for a failure message."""
    return repr(tokenizer.convert_ids_to_tokens(ids[max(start, 0) : end]))


def check_template(tokenizer, official: str, sample: Labelled, **template_kwargs) -> list[str]:
    """The training template without markers renders the official template's text for this conversation."""
    difference = template_difference(tokenizer, tokenizer.chat_template, official, sample.messages, **template_kwargs)
    return [f"conversation {sample.index}: {difference}"] if difference else []


def check_derived_spans(tokenizer, official: str, sample: Labelled) -> list[str]:
    """A derived training template supervises exactly the spans derived from the official template."""
    mask = [int(label != IGNORED) for label in sample.labels]
    difference = span_difference(tokenizer, official, sample.messages, sample.input_ids, mask, sample.first)
    return (
        [f"conversation {sample.index}: the derived training template's spans differ: {difference}"]
        if difference
        else []
    )


def check_tokens(tokenizer, official: str, sample: Labelled, **template_kwargs) -> list[str]:
    """The trained tokens are the official text's tokens, with its BOS tokens, as many and where it has them."""
    where = f"conversation {sample.index}"
    text = tokenizer.apply_chat_template(sample.messages, chat_template=official, tokenize=False, **template_kwargs)
    expected = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids, problems = sample.input_ids, []
    if (
        ids == [*expected, tokenizer.eos_token_id]
        and expected[-1:] != ids[-1:]
        and not has_generation_markers(tokenizer.chat_template)
    ):
        expected = ids  # derived spans: the end-of-turn appended to a final reply the template leaves open (GLM-4)
    bos = tokenizer.bos_token_id
    if bos is not None:
        at, want = [i for i, t in enumerate(ids) if t == bos], [i for i, t in enumerate(expected) if t == bos]
        if at != want:
            problems.append(f"{where}: BOS at positions {at[:8]}, the official text has it at {want[:8]}")
    if ids != expected and not problems:
        at = first_difference(ids, expected)
        problems.append(
            f"{where}: token {at} is {show_tokens(tokenizer, ids, at, at + 3)}, the official text's is "
            f"{show_tokens(tokenizer, expected, at, at + 3)}"
        )
    return problems


def check_labels(tokenizer, sample: Labelled) -> list[str]:
    """Each supervised stretch is one reply's content followed by the end-of-turn token, and nothing else is."""
    where, ids, eot = f"conversation {sample.index}", sample.input_ids, tokenizer.eos_token_id
    runs = supervised_runs(sample.labels)
    problems = []
    for start, end in runs:
        if sample.labels[start:end] != ids[start:end]:
            problems.append(f"{where}: labels at {start}..{end} are not the input tokens")
    if len(runs) != len(sample.replies):
        spans = [f"{s}..{e} {show_tokens(tokenizer, ids, s, min(e, s + 6))}" for s, e in runs[:4]]
        return [*problems, f"{where}: {len(runs)} supervised span(s) for {len(sample.replies)} replies: {spans}"]
    for number, ((start, end), reply) in enumerate(zip(runs, sample.replies, strict=True), 1):
        if ids[end - 1] != eot:
            problems.append(
                f"{where}, reply {number}: the supervised span {start}..{end} ends on "
                f"{show_tokens(tokenizer, ids, end - 3, end)}, not the end-of-turn token {tokenizer.eos_token!r} "
                f"(next: {show_tokens(tokenizer, ids, end, end + 2)})"
            )
            continue
        content = tokenizer.decode(ids[start : end - 1])
        if content.strip() != reply.strip():
            problems.append(
                f"{where}, reply {number}: the supervised span {start}..{end} is {content!r} plus the end-of-turn "
                f"token, the reply is {reply!r} (first tokens {show_tokens(tokenizer, ids, start, start + 4)})"
            )
    return problems


def truncation(sample: Labelled, max_length: int | None, keep_end: bool = False) -> str | None:
    """Where `max_length` cuts this sample, if it does: which replies lose tokens."""
    if max_length is None or len(sample.input_ids) <= max_length:
        return None
    kept = range(len(sample.input_ids) - max_length, len(sample.input_ids)) if keep_end else range(max_length)
    cut = [n for n, (s, e) in enumerate(supervised_runs(sample.labels), 1) if s not in kept or e - 1 not in kept]
    return f"conversation {sample.index}: {len(sample.input_ids)} tokens > max_length {max_length}, reply {cut} cut"


def audit_samples(tokenizer, official: str, samples: list[Labelled], max_length: int | None, **kw) -> AuditReport:
    report = AuditReport(samples=len(samples))
    official = official or strip_generation_markers(tokenizer.chat_template)  # a model without one: ours is it
    for sample in samples:
        report.failures += check_template(tokenizer, official, sample, **kw)
        report.failures += check_tokens(tokenizer, official, sample, **kw)
        report.failures += check_labels(tokenizer, sample)
        if is_derived_training_template(tokenizer.chat_template):
            report.failures += check_derived_spans(tokenizer, official, sample)
        if cut := truncation(sample, max_length):
            report.truncated.append(cut)
    return report


def marked_sample(tokenizer, sample: Labelled, colour: bool | None = None) -> str:
    """The sample's text with its supervised spans marked: green on a terminal, `[[...]]` otherwise."""
    colour = sys.stdout.isatty() if colour is None else colour
    opening, closing = ("\033[1;32m", "\033[0m") if colour else ("[[", "]]")
    text, last = "", 0
    for start, end in supervised_runs(sample.labels):
        text += tokenizer.decode(sample.input_ids[last:start]) + opening
        text += tokenizer.decode(sample.input_ids[start:end]) + closing
        last = end
    return text + tokenizer.decode(sample.input_ids[last:])


def audit_before_training(trainer, args, official: str, dataset: Dataset) -> AuditReport:
    """The audit on the first samples through the trainer's own preparation, with the recipe's training arguments
    `args` (for derived spans the trainer's own leave `assistant_only_loss` to the masks); the main process prints
    one marked sample (as LLaMA-Factory does at every start: shown whatever the log level)."""
    subset = dataset.select(range(min(TRAINING_AUDIT_SAMPLES, len(dataset))))
    tokenizer = trainer.processing_class
    samples = trl_labels(trainer, tokenizer, args, subset)
    report = audit_samples(tokenizer, official, samples, args.max_length)
    report.raise_on_failure()
    if trainer.accelerator.is_main_process:
        print(
            f"label audit: {report.samples} samples, loss on each reply and its end-of-turn token only; "
            f"{len(report.truncated)} truncated. One sample, supervised spans marked:\n"
            f"{marked_sample(tokenizer, samples[0])}",
            flush=True,
        )
    return report
