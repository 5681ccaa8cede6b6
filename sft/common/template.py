"""Chat templates for training: the model's own template with `{% generation %}` markers around the replies.

Where TRL bundles a training form of a model's official template it is used, ours only where needed:
Llama-2-chat (TRL has none), Llama-3.1 (TRL has none), Qwen2.5 (TRL's also trains the newlines around a reply)
Qwen3 (TRL's writes a think block before every reply, which the official template does not), Qwen3-Instruct-2507
(TRL's also trains the newline after `<|im_end|>`) and DeepSeek-R1-Distill (TRL's also trains the `<｜Assistant｜>`
header, which the generation prompt writes). For any other
template a training form is derived (`derive_training_template`): the text it writes before and after each role's
content, learnt by rendering probe conversations, written as a template with markers, and proven on the probes
(its text is the official text, its spans those of `derived_reply_mask`: what rendering adds when a reply is
appended to the conversation). A template that writes no end-of-turn token after a reply (GLM-4) or is not one
piece per role (a system prompt folded into the first user turn) trains on the official template with spans derived
per conversation (`derived_reply_mask`); one that rewrites earlier turns is refused.
"""

import re
from pathlib import Path

from jinja2.exceptions import TemplateError
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
# The first line of a training template derived from an official one (`derive_training_template`).
DERIVED_TEMPLATE_HEADER = (
    "{#- lccc-sft: derived from the model's official chat template, whose text it renders (proven on probes) -#}\n"
)
# Probe contents: text no template writes by itself, so each one's place in a rendering is unambiguous.
SYSTEM_PROBE = {"role": "system", "content": "PROBE-SYSTEM"}
TURN_PROBES = [
    [{"role": "user", "content": f"PROBE-USER-{n}"}, {"role": "assistant", "content": f"PROBE-ASSISTANT-{n}"}]
    for n in (1, 2, 3)
]


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
    """The template training renders: one with generation markers around the replies where we or TRL have it or
    it can be derived from the official one (`derive_training_template`), else the official template itself, whose
    reply spans training then derives per conversation (`derived_reply_mask`)."""
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
    except ValueError:  # no training form: one derived from it, else its spans are derived per conversation
        return derive_training_template(tokenizer, template) or template


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


def first_difference(a, b) -> int:
    """The first position where two strings (or lists) differ; the shorter one's length if one is a prefix."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def template_difference(tokenizer, training: str, official: str, messages: list[dict], **template_kwargs) -> str | None:
    """Where `training` without its generation markers renders `messages` other than `official` does, if it does."""
    trained = render(tokenizer, messages, chat_template=strip_generation_markers(training), **template_kwargs)
    expected = render(tokenizer, messages, chat_template=official, **template_kwargs)
    if trained == expected:
        return None
    at = first_difference(trained, expected)
    near = slice(max(at - 20, 0), at + 20)
    return (
        f"the training template without its generation markers differs from the official template at "
        f"character {at}: trains {trained[near]!r}, official {expected[near]!r}"
    )


def span_difference(
    tokenizer, official: str, messages: list[dict], input_ids: list[int], mask: list[int], first: int = 0
) -> str | None:
    """Where the supervised tokens `mask` of `input_ids` differ from the reply spans derived from `official` by
    rendering growing prefixes of the conversation (`derived_reply_mask`), if they do."""
    derived = derived_reply_mask(tokenizer, messages, first, chat_template=official)
    if list(input_ids) != derived["input_ids"]:
        at = first_difference(list(input_ids), derived["input_ids"])
        return (
            f"token {at} is not the official text's ({tokenizer.convert_ids_to_tokens(list(input_ids[at : at + 3]))})"
        )
    if list(mask) != derived["assistant_masks"]:
        at = first_difference(list(mask), derived["assistant_masks"])
        tokens = tokenizer.convert_ids_to_tokens(list(input_ids[max(at - 2, 0) : at + 3]))
        supervised = "supervised" if mask[at] else "not supervised"
        return f"token {at} is {supervised}, unlike in the spans derived from the official template (near {tokens})"
    return None


def probe_conversations(system: bool) -> list[tuple[list[dict], bool]]:
    """Conversations of sentinel contents, one to three turns, with a system prompt where the template takes one,
    ending on a reply or on a user turn with and without the generation prompt: (messages, generation prompt)."""
    probes = []
    for turns in (1, 2, 3):
        for opening in [[], [SYSTEM_PROBE]] if system else [[]]:
            messages = opening + [m for pair in TURN_PROBES[:turns] for m in pair]
            for contents in (messages, padded(messages)):  # padded: kept or trimmed as the official template does
                probes += [(contents, False), (contents[:-1], False), (contents[:-1], True)]
    return probes


def padded(messages: list[dict]) -> list[dict]:
    """The messages with whitespace around each content (which some templates trim)."""
    return [{**message, "content": f" \n {message['content']}  "} for message in messages]


def trimmed_roles(tokenizer, official: str, system: bool) -> set[str] | None:
    """The roles whose content the official template trims of surrounding whitespace (None: it does something
    else to it)."""
    messages = ([SYSTEM_PROBE] if system else []) + TURN_PROBES[0]
    text, trimmed = render(tokenizer, padded(messages), chat_template=official), set()
    for bare, spaced in zip(messages, padded(messages), strict=True):
        if spaced["content"] not in text:
            if bare["content"] not in text:
                return None
            trimmed.add(bare["role"])
    return trimmed


def template_pieces(tokenizer, official: str) -> dict | None:
    """The text `official` writes at the start and before and after each role's content, read off renderings of
    probe conversations; None where a reply is not followed by the end-of-turn token or the pieces do not fit
    together (e.g. a system prompt folded into the first user turn)."""

    def text(messages, prompt=False):
        return render(tokenizer, messages, add_generation_prompt=prompt, chat_template=official)

    (user, reply), (next_user, _) = TURN_PROBES[0], TURN_PROBES[1]
    u, up, ua, uau = text([user]), text([user], True), text([user, reply]), text([user, reply, next_user])
    if not (up.startswith(u) and ua.startswith(up) and uau.startswith(ua)):
        return None
    after_reply = ua[ua.index(reply["content"]) + len(reply["content"]) :]
    if tokenizer.eos_token not in after_reply:
        return None
    cut = after_reply.rindex(tokenizer.eos_token) + len(tokenizer.eos_token)
    user_start = uau[len(ua) : uau.index(next_user["content"])]
    head = u[: u.index(user["content"])]
    if not head.endswith(user_start):
        return None
    pieces = {
        "start": head[: len(head) - len(user_start)],
        "user_start": user_start,
        "user_end": u[u.index(user["content"]) + len(user["content"]) :],
        "prompt": up[len(u) :],
        "reply_start": ua[len(up) : ua.index(reply["content"])],
        "reply_end": after_reply[:cut],
        "after_reply": after_reply[cut:],
    }
    try:
        su = text([SYSTEM_PROBE, user])
    except TemplateError:  # the official template refuses a system prompt: so does the derived one
        su = None
    if su is not None:
        head, system = su[: su.index(user["content"])], SYSTEM_PROBE["content"]
        if system not in head or not head.endswith(user_start):
            return None
        pieces["system_start"] = head[: head.index(system)]
        pieces["system_end"] = head[head.index(system) + len(system) : len(head) - len(user_start)]
    pieces["trimmed"] = trimmed_roles(tokenizer, official, system=su is not None)
    return pieces if pieces["trimmed"] is not None else None


CONTENT, TRIMMED_CONTENT = object(), object()  # a message's content, as it is or trimmed, in `jinja_output`
EXPRESSIONS = {CONTENT: "message['content']", TRIMMED_CONTENT: "(message['content'] | trim)"}


def jinja_output(*parts, trim: bool = True) -> str:
    """A Jinja output tag writing `parts` in order: `CONTENT` is the message's content, anything else literal text
    (as a Jinja string literal: Python's escapes, which Jinja's lexer reads back); empty texts are left out."""
    terms = [EXPRESSIONS[part] if part in EXPRESSIONS else repr(part) for part in parts if part]
    return f"{{{{{'-' if trim else ''} {' + '.join(terms)} }}}}" if terms else ""


def write_training_template(pieces: dict) -> str:
    """A training template from `template_pieces`: each reply (after the generation prompt) and its end-of-turn
    token inside `{% generation %}` markers; a role the pieces do not cover is refused when rendering."""
    p = pieces
    content = {role: TRIMMED_CONTENT if role in p["trimmed"] else CONTENT for role in ("system", "user", "assistant")}
    if "system_start" in p:
        system = jinja_output(p["system_start"], content["system"], p["system_end"])
        first = "loop.first and message['role'] != 'system'"
    else:
        system = "{{- raise_exception('the official chat template takes no system message') }}"
        first = "loop.first"
    unknown = "this training template, derived from the official one, renders a first system message, user and "
    unknown += "assistant messages, not "
    reply = jinja_output(p["reply_start"], content["assistant"], p["reply_end"], trim=False)
    return (
        f"{DERIVED_TEMPLATE_HEADER}{{%- for message in messages %}}\n"
        + (f"{{%- if {first} %}}{jinja_output(p['start'])}{{%- endif %}}\n" if p["start"] else "")
        + f"{{%- if message['role'] == 'system' and loop.first %}}\n{system}\n"
        f"{{%- elif message['role'] == 'user' %}}\n{jinja_output(p['user_start'], content['user'], p['user_end'])}\n"
        f"{{%- elif message['role'] == 'assistant' %}}\n{jinja_output(p['prompt'])}"
        f"{{% generation %}}{reply}{{% endgeneration %}}{jinja_output(p['after_reply'], trim=False)}\n"
        f"{{%- else %}}\n{{{{- raise_exception({unknown!r} + message['role']) }}}}\n"
        "{%- endif %}\n{%- endfor %}\n"
        + (f"{{%- if add_generation_prompt %}}{jinja_output(p['prompt'])}{{%- endif %}}" if p["prompt"] else "")
    )


def derive_training_template(tokenizer, official: str) -> str | None:
    """A training form of `official`, proven on the probe conversations: without its markers it renders exactly
    the official text and its generation spans are the derived ones (`derived_reply_mask`). None where the template
    cannot be captured so (`template_pieces`): its spans are then derived per conversation. A template that
    rewrites earlier turns, or whose generation prompt is not how it starts a reply, is refused."""
    try:
        for messages, _ in probe_conversations(system=False):
            derived_reply_spans(tokenizer, messages, chat_template=official)  # refuses a template rewriting turns
        pieces = template_pieces(tokenizer, official)
        training = pieces and write_training_template(pieces)
        return (
            training if training and proven_on_probes(tokenizer, training, official, "system_start" in pieces) else None
        )
    except TemplateError:  # a probe the official template refuses: the data will say whether spans can be derived
        return None


def proven_on_probes(tokenizer, training: str, official: str, system: bool) -> bool:
    """`training` without its markers renders each probe conversation as `official` does, and its generation spans
    are the spans derived from `official`."""
    for messages, prompt in probe_conversations(system):
        if template_difference(tokenizer, training, official, messages, add_generation_prompt=prompt):
            return False
        if messages[-1]["role"] == "assistant":
            marked = tokenizer.apply_chat_template(
                messages, chat_template=training, return_dict=True, return_assistant_tokens_mask=True
            )
            if span_difference(tokenizer, official, messages, marked["input_ids"], marked["assistant_masks"]):
                return False
    return True


def is_derived_training_template(template: str | None) -> bool:
    """A training template `derive_training_template` wrote (with its markers: stripped, it is an inference one)."""
    return bool(template) and template.startswith(DERIVED_TEMPLATE_HEADER) and has_generation_markers(template)


# How a run's training template came about (its summary's `training_template`, and the log line at the start).
TEMPLATE_KINDS = {
    "derived": "derived from the official one with generation markers (proven on probes), saved as chat_template.jinja",
    "marked": "one with generation markers (ours, TRL's or chat_template_path's), saved as chat_template.jinja",
    "official_with_derived_spans": "the official one, each reply's span derived per conversation (no end-of-turn "
    "token of its own after a reply, or not one piece per role)",
}


def training_template_kind(template: str) -> str:
    """Which of `TEMPLATE_KINDS` a training template is."""
    if is_derived_training_template(template):
        return "derived"
    return "marked" if has_generation_markers(template) else "official_with_derived_spans"
