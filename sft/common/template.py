"""Chat templates for training: the model's own template with `{% generation %}` markers around the replies.

Where TRL bundles a training form of a model's official template it is used, ours only where needed:
Llama-2-chat (TRL has none), Llama-3.1 (TRL has none), Qwen2.5 (TRL's also trains the newlines around a reply)
and Qwen3 (TRL's writes a think block before every reply, which the official template does not).
"""

import re
from pathlib import Path

from trl.chat_template_utils import (
    get_training_chat_template,
    has_generation_markers,
    llama3_1_chat_template,
    qwen2_5_chat_template,
    qwen3_chat_template,
)

from sft.common.errors import UserError

TEMPLATES = Path(__file__).parent / "templates"
LLAMA2_TRAINING_TEMPLATE = (TEMPLATES / "llama2_chat_training.jinja").read_text(encoding="utf-8")
# Official templates, exactly as the models ship them (TRL keeps copies), and our training forms of them.
OUR_TRAINING_TEMPLATES = {
    llama3_1_chat_template: (TEMPLATES / "llama3_1_training.jinja").read_text(encoding="utf-8"),
    qwen2_5_chat_template: (TEMPLATES / "qwen2_5_training.jinja").read_text(encoding="utf-8"),
    qwen3_chat_template: (TEMPLATES / "qwen3_training.jinja").read_text(encoding="utf-8"),
}
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


def training_chat_template(tokenizer, chat_template_path: str | None = None) -> str:
    """Return a template whose assistant replies are wrapped in generation markers, or fail clearly."""
    if chat_template_path:
        path = Path(chat_template_path)
        if not path.is_file():
            raise UserError(f"chat_template_path {chat_template_path!r} is not a file")
        template = path.read_text(encoding="utf-8")
    else:
        template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise UserError(
            "the tokenizer has no chat template; give one with `chat_template_path: path/to/template.jinja` "
            "in the recipe (it needs {% generation %} markers around the assistant replies)"
        )
    if has_generation_markers(template):
        return template
    if is_llama2_chat_template(template):
        return LLAMA2_TRAINING_TEMPLATE
    if template in OUR_TRAINING_TEMPLATES:
        return OUR_TRAINING_TEMPLATES[template]
    tokenizer.chat_template = template
    try:
        return get_training_chat_template(tokenizer) or template
    except ValueError:
        raise UserError(
            "the model's chat template has no {% generation %} markers and TRL cannot add them, so the loss "
            "cannot be limited to the assistant replies; give a template with the markers via "
            "`chat_template_path`"
        ) from None
