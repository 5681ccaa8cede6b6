"""Chat templates for training: the model's own template with `{% generation %}` markers around the replies.

Where TRL bundles a training form of a model's official template it is used, ours only where needed:
Llama-2-chat (TRL has none), Llama-3.1 (TRL has none), Qwen2.5 (TRL's also trains the newlines around a reply)
Qwen3 (TRL's writes a think block before every reply, which the official template does not) and
DeepSeek-R1-Distill (TRL's also trains the `<｜Assistant｜>` header, which the generation prompt writes). Any other
template trains as it is: each reply's span is what rendering adds when the reply is appended to the conversation
(`derived_reply_mask`), refused where the template rewrites earlier turns.
"""

import re
from pathlib import Path

from trl.chat_template_utils import (
    deepseek_r1_distill_chat_template,
    get_training_chat_template,
    has_generation_markers,
    llama3_1_chat_template,
    qwen2_5_chat_template,
    qwen3_chat_template,
    qwen3_instruct_2507_chat_template,
)

from sft.common.errors import UserError

TEMPLATES = Path(__file__).parent / "templates"
LLAMA2_TRAINING_TEMPLATE = (TEMPLATES / "llama2_chat_training.jinja").read_text(encoding="utf-8")
# Official templates, exactly as the models ship them (TRL keeps copies), and our training forms of them.
OUR_TRAINING_TEMPLATES = {
    llama3_1_chat_template: (TEMPLATES / "llama3_1_training.jinja").read_text(encoding="utf-8"),
    qwen2_5_chat_template: (TEMPLATES / "qwen2_5_training.jinja").read_text(encoding="utf-8"),
    qwen3_chat_template: (TEMPLATES / "qwen3_training.jinja").read_text(encoding="utf-8"),
    qwen3_instruct_2507_chat_template: (TEMPLATES / "qwen3_instruct_2507_training.jinja").read_text(encoding="utf-8"),
    deepseek_r1_distill_chat_template: (TEMPLATES / "deepseek_r1_distill_training.jinja").read_text(encoding="utf-8"),
}
ASK_FOR_MARKERS = (
    "give a training template with {% generation %} markers around each reply and its end-of-turn token via "
    "`chat_template_path`"
)
_GENERATION_MARKERS = re.compile(r"{%-?\s*(end)?generation\s*-?%}")


def strip_generation_markers(template: str) -> str:
    """The inference form of a training template: the same text without `{% generation %}` blocks."""
    return _GENERATION_MARKERS.sub("", template)


def inference_chat_template(template: str) -> str:
    """What a model folder ships for chatting: the official template behind one of ours, else the unmarked text."""
    official = {training: official for official, training in OUR_TRAINING_TEMPLATES.items()}
    return official.get(template) or strip_generation_markers(template)


def is_llama2_chat_template(template: str) -> bool:
    """Llama-2-chat's format: `[INST]` turns and a `<<SYS>>` block (Meta's template and its variants)."""
    return "[INST]" in template and "<<SYS>>" in template


def read_template_file(chat_template_path: str) -> str:
    path = Path(chat_template_path)
    if not path.is_file():
        raise UserError(f"chat_template_path {chat_template_path!r} is not a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"chat_template_path {chat_template_path!r} is not UTF-8 text") from None


def check_template_syntax(template: str, source: str) -> None:
    """Compile the template as transformers will (with its `{% generation %}` tag): a Jinja mistake is named here."""
    from jinja2 import TemplateSyntaxError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(template)
    except TemplateSyntaxError as err:
        raise UserError(f"{source} is not a valid Jinja template: line {err.lineno}: {err.message}") from None


def training_chat_template(tokenizer, chat_template_path: str | None = None) -> str:
    """The template training renders: one with generation markers around the replies where we or TRL have it,
    else the official template itself, whose reply spans training then derives (`derived_reply_mask`)."""
    if chat_template_path:
        template = read_template_file(chat_template_path)
        source = f"chat_template_path {chat_template_path!r}"
    else:
        template = tokenizer.chat_template
        source = "the model's chat template"
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise UserError(
            "the tokenizer has no chat template; give one with `chat_template_path: path/to/template.jinja` "
            "in the recipe (it needs {% generation %} markers around the assistant replies)"
        )
    check_template_syntax(template, source)
    if has_generation_markers(template):
        return template
    if is_llama2_chat_template(template):
        return LLAMA2_TRAINING_TEMPLATE
    if template in OUR_TRAINING_TEMPLATES:
        return OUR_TRAINING_TEMPLATES[template]
    tokenizer.chat_template = template
    try:
        return get_training_chat_template(tokenizer) or template
    except ValueError:  # no training form: the spans are derived from the official template (`derived_reply_mask`)
        return template


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False, **template_kwargs) -> str:
    """The tokenizer's chat template applied to `messages`, as text (no messages: no text)."""
    if not messages:
        return ""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **template_kwargs
    )


def derived_reply_spans(tokenizer, messages: list[dict], first: int = 0, **template_kwargs) -> list[tuple[int, int]]:
    """Character spans of the replies (from message `first` on) in the official rendering of `messages`.

    A reply's span is what rendering adds when the reply is appended to the conversation so far, after the
    generation prompt. That holds only if each such rendering is a prefix of the whole one; a template that
    rewrites earlier turns (drops their reasoning, marks only the last reply) is refused.
    """
    full = render(tokenizer, messages, **template_kwargs)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < first:
            continue
        prompt = render(tokenizer, messages[:i], add_generation_prompt=True, **template_kwargs)
        through = render(tokenizer, messages[: i + 1], **template_kwargs)
        if not through.startswith(prompt):
            raise UserError(
                f"the chat template's generation prompt {prompt[-30:]!r} is not how it renders the start of reply "
                f"{i} ({through[len(prompt) - 30 : len(prompt) + 10]!r}), so the reply's span cannot be derived "
                f"from it; {ASK_FOR_MARKERS}"
            )
        if not full.startswith(through):
            at = next(n for n, (a, b) in enumerate(zip(through, full, strict=False)) if a != b)
            raise UserError(
                f"the chat template rewrites earlier turns (the text up to reply {i} of a conversation is not a "
                f"prefix of the whole conversation's text, from character {at}: {through[at : at + 30]!r} vs "
                f"{full[at : at + 30]!r}; e.g. it drops reasoning from history), so the replies' spans cannot be "
                f"derived from it; {ASK_FOR_MARKERS}"
            )
        spans.append((len(prompt), len(through)))
    return spans


def derived_reply_mask(tokenizer, messages: list[dict], first: int = 0, **template_kwargs) -> dict:
    """`input_ids` of the official text and `assistant_masks` on each reply (from message `first` on) and its
    end-of-turn token, derived by rendering growing prefixes of the conversation.

    A reply's span runs to its end-of-turn token (the tokenizer's `eos_token`): the last one inside what the reply
    added, else the one right after it (GLM-4's next `<|user|>`); a final reply the template ends with no
    end-of-turn token gets one appended, as the model must learn to stop there.
    """
    text = render(tokenizer, messages, **template_kwargs)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets, eot = list(encoded["input_ids"]), encoded["offset_mapping"], tokenizer.eos_token_id
    mask = [0] * len(ids)
    for start, end in derived_reply_spans(tokenizer, messages, first, **template_kwargs):
        tokens = [n for n, (a, b) in enumerate(offsets) if a < end and b > start]
        if not tokens:
            raise UserError(f"a reply renders as no text at character {start}: {ASK_FOR_MARKERS}")
        ends = [n for n in tokens if ids[n] == eot]
        if ends:
            last = ends[-1]
        elif tokens[-1] + 1 < len(ids) and ids[tokens[-1] + 1] == eot:
            last = tokens[-1] + 1
        elif tokens[-1] + 1 == len(ids):
            ids.append(eot)
            mask.append(0)
            last = len(ids) - 1
        else:
            raise UserError(
                f"the chat template ends a reply with no end-of-turn token {tokenizer.eos_token!r} (after "
                f"{text[end - 20 : end + 20]!r}), so the model would never learn to stop; {ASK_FOR_MARKERS}"
            )
        for n in range(tokens[0], last + 1):
            mask[n] = 1
    return {"input_ids": ids, "assistant_masks": mask}


def reply_masked_tokens(tokenizer, messages: list[dict], **template_kwargs) -> dict:
    """`input_ids` and `assistant_masks`: from the template's generation markers where it has them, else derived
    from the official template (`derived_reply_mask`)."""
    if not has_generation_markers(tokenizer.chat_template):
        return derived_reply_mask(tokenizer, messages, **template_kwargs)
    return tokenizer.apply_chat_template(
        messages, return_dict=True, return_assistant_tokens_mask=True, **template_kwargs
    )


def with_derived_reply_masks(tokenizer, dataset):
    """A dataset's samples with `input_ids` and `assistant_masks` derived from the official template beside their
    messages, for a template without generation markers (TRL's pre-tokenized path builds the labels from the masks);
    unchanged for a template with markers, whose masks TRL takes from the markers."""
    if has_generation_markers(tokenizer.chat_template):
        return dataset

    def tokenize(row):
        if row.get("messages"):
            return derived_reply_mask(tokenizer, row["messages"])
        return derived_reply_mask(tokenizer, row["prompt"] + row["completion"], first=len(row["prompt"]))

    return dataset.map(tokenize, desc="Deriving the reply spans from the official chat template")
