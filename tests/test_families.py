"""Qwen2.5, Qwen3, Qwen3-Instruct-2507, GLM-4, DeepSeek-R1-Distill and Llama-3 beside Llama-2: the official
template's text, the loss on the replies and their end-of-turn token only, and one short smoke run per family that
trains, evaluates, chats, merges and stops at the right token."""

import json
import math
from dataclasses import dataclass

import httpx
import pytest
import torch
from conftest import running_server
from datasets import Dataset, DatasetDict
from helpers import LAUNCH, ROOT, run_command
from test_template import HANDWRITTEN, lccc_conversations, supervised_runs
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList
from trl.chat_template_utils import (
    deepseek_r1_distill_chat_template,
    has_generation_markers,
    llama3_1_chat_template,
    llama3_chat_template,
    llama3_training_chat_template,
    qwen2_5_chat_template,
    qwen3_chat_template,
    qwen3_instruct_2507_chat_template,
)

from sft.common.config import parse_recipe
from sft.common.errors import UserError
from sft.common.inference import render_prompt
from sft.common.model import TINY_MODEL_DIRS
from sft.common.template import (
    OUR_TRAINING_TEMPLATES,
    strip_generation_markers,
    template_difference,
    training_chat_template,
    training_template_kind,
)
from sft.tiny import BUILDERS, GLM4_CHAT_TEMPLATE, SAMPLE_DATA
from sft.train.trainer import build_trainer


@dataclass
class Family:
    name: str
    recipe: str
    official: str  # the chat template as the real models ship it
    end_of_turn: str
    bos: str | None  # the begin-of-text token the template writes once, if the family has one
    reply_header: str  # the text just before a reply (the end of the generation prompt)
    trims: bool  # whether the template strips the white space around a message
    reply_opening: str = ""  # what the template writes at the start of a reply, after the generation prompt
    served_prompt_end: str | None = None  # how a served prompt ends, where not with `reply_header` (R1's <think>)


FAMILIES = {
    "qwen2_5": Family(
        "qwen2_5", "recipes/smoke_qwen2_5.yaml", qwen2_5_chat_template, "<|im_end|>", None, "assistant\n", False
    ),
    "qwen3": Family("qwen3", "recipes/smoke_qwen3.yaml", qwen3_chat_template, "<|im_end|>", None, "\n", False),
    "qwen3_2507": Family(
        "qwen3_2507",
        "recipes/smoke_qwen3_2507.yaml",
        qwen3_instruct_2507_chat_template,
        "<|im_end|>",
        None,
        "assistant\n",
        False,
    ),
    # GLM-4-0414: no training template of ours or TRL's, the spans are derived; the reply starts with a newline
    # and ends where the next <|user|> begins
    "glm4": Family(
        "glm4", "recipes/smoke_glm4.yaml", GLM4_CHAT_TEMPLATE, "<|user|>", None, "<|assistant|>", False, "\n"
    ),
    # DeepSeek-R1-Distill: the generation prompt opens a think block that the official text of a conversation
    # (reasoning dropped from every reply) never has
    "r1_distill": Family(
        "r1_distill",
        "recipes/smoke_r1_distill.yaml",
        deepseek_r1_distill_chat_template,
        "<｜end▁of▁sentence｜>",
        "<｜begin▁of▁sentence｜>",
        "<｜Assistant｜>",
        False,
        served_prompt_end="<｜Assistant｜><think>\n",
    ),
    "llama3": Family(
        "llama3",
        "recipes/smoke_llama3.yaml",
        llama3_1_chat_template,
        "<|eot_id|>",
        "<|begin_of_text|>",
        "<|end_header_id|>\n\n",
        True,
    ),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request) -> Family:
    return FAMILIES[request.param]


def tiny_model_of(name: str):
    """The family's smoke model, built on first use exactly as `make tiny-model` builds it."""
    path = ROOT / TINY_MODEL_DIRS[name]
    if not (path / "config.json").exists():
        BUILDERS[name](str(path))
    return path


@pytest.fixture
def tokenizer(family):
    return AutoTokenizer.from_pretrained(tiny_model_of(family.name))


@pytest.fixture(scope="module")
def conversations():
    """Handwritten cases plus dialogues of the shipped sample, one to three turns, with and without a system prompt."""
    return HANDWRITTEN + lccc_conversations(SAMPLE_DATA, 20)


def test_glm4_template_renders_what_public_sources_show_of_glm_4_0414():
    """The forms corroborated in docs/recipes-and-bases.md: a chat as LLaMA-Factory's `glm4` template writes it, a
    tool call as `<|assistant|>name` + newline + arguments (no space), a result as an `<|observation|>` turn, and
    the tool list as ms-swift's `glm4_0414` agent template writes it (no system preamble)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_of("glm4"))

    def rendered(messages, **kwargs):
        return tokenizer.apply_chat_template(
            messages, chat_template=GLM4_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True, **kwargs
        )

    chat = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"},
    ]
    assert rendered(chat) == "[gMASK]<sop><|system|>\nS<|user|>\nU1<|assistant|>\nA1<|user|>\nU2<|assistant|>"
    call = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "metadata": "get_weather", "content": '{"city": "北京"}'},
        {"role": "observation", "content": "晴"},
    ]
    expected = '[gMASK]<sop><|user|>\nq<|assistant|>get_weather\n{"city": "北京"}<|observation|>\n晴<|assistant|>'
    assert rendered(call) == expected
    tools = [{"type": "function", "function": {"name": n, "description": "d", "parameters": {}}} for n in "fg"]
    described = [
        f"## {n}\n\n"
        + json.dumps({"name": n, "description": "d", "parameters": {}}, ensure_ascii=False, indent=4)
        + "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
        for n in "fg"
    ]
    tool_list = "<|system|>\n# 可用工具\n\n" + "\n".join(described)
    assert rendered(call[:1], tools=tools) == f"[gMASK]<sop>{tool_list}<|user|>\nq<|assistant|>"


def test_the_tiny_model_ships_the_official_template_and_stops_at_the_end_of_turn(family, tokenizer):
    assert tokenizer.chat_template == family.official
    assert tokenizer.eos_token == family.end_of_turn
    config = json.loads((tiny_model_of(family.name) / "generation_config.json").read_text(encoding="utf-8"))
    assert tokenizer.convert_tokens_to_ids(family.end_of_turn) in config["eos_token_id"]


OFFICIAL_TEMPLATES = {  # name: (template, the tiny model whose tokens it uses, TRL's training form if that is used)
    "qwen2_5": (qwen2_5_chat_template, "qwen2_5", None),
    "qwen3_instruct_2507": (qwen3_instruct_2507_chat_template, "qwen3_2507", None),
    "llama3_1": (llama3_1_chat_template, "llama3", None),
    "llama3": (llama3_chat_template, "llama3", llama3_training_chat_template),
    "qwen3": (qwen3_chat_template, "qwen3", None),
    "deepseek_r1_distill": (deepseek_r1_distill_chat_template, "r1_distill", None),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_TEMPLATES))
def test_training_templates_render_exactly_the_official_text(name, conversations):
    """Ours for Qwen2.5, Qwen3, Qwen3-Instruct-2507, Llama-3.1 and R1-Distill, TRL's for Llama-3: the same text as the
    official template, with and without the markers, for whole conversations and for the prompt of the next reply."""
    official, model, trl_training = OFFICIAL_TEMPLATES[name]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_of(model))
    tokenizer.chat_template = official
    training = training_chat_template(tokenizer)
    assert has_generation_markers(training) and not has_generation_markers(strip_generation_markers(training))
    assert training == (trl_training or OUR_TRAINING_TEMPLATES[official])
    for messages in conversations:
        for conversation, prompt in ((messages, False), (messages[:-1], True)):
            expected = tokenizer.apply_chat_template(
                conversation, chat_template=official, tokenize=False, add_generation_prompt=prompt
            )
            for template in (training, strip_generation_markers(training)):
                rendered = tokenizer.apply_chat_template(
                    conversation, chat_template=template, tokenize=False, add_generation_prompt=prompt
                )
                assert rendered == expected


# What a local variant of each official template (one neither we nor TRL know) trains with: a template derived from
# it, the variant itself with spans derived per conversation (GLM-4), or a refusal (tests/test_derived_spans.py).
UNKNOWN_VARIANT = {
    "qwen2_5": "derived",  # its default system prompt is the derived template's start without a system message
    "llama3": "derived",  # the same for its date header
    "glm4": "official_with_derived_spans",  # a reply ends at the next <|user|>: no end-of-turn token of its own
    "qwen3": "rewrites earlier turns",  # the think block before the last reply only
    "qwen3_2507": "derived",  # ChatML with no default system prompt and no think block
    "r1_distill": "generation prompt",  # it opens a think block that its replies do not have
}


def test_an_unknown_variant_of_a_template_gets_a_derived_one_or_is_refused(family, tokenizer, conversations):
    unknown = family.official + "{#- a local variant: neither we nor TRL know it #}"
    tokenizer.chat_template = unknown
    expected = UNKNOWN_VARIANT.get(family.name)
    if expected in (None, "derived", "official_with_derived_spans"):
        training = training_chat_template(tokenizer)
        assert training_template_kind(training) == (expected or "marked")  # Llama-2: ours, whatever the variant
        for messages in conversations if expected == "derived" else []:
            assert template_difference(tokenizer, training, unknown, messages) is None
    else:
        with pytest.raises(UserError, match=expected):
            training_chat_template(tokenizer)


@pytest.fixture(scope="module")
def trainer(family, conversations, tmp_path_factory):
    """The family's smoke trainer (4-bit tiny model, LoRA) on the test conversations, as `make sft` builds it."""
    tiny_model_of(family.name)
    output_dir = tmp_path_factory.mktemp(f"template-{family.name}")
    recipe = parse_recipe(["--config", family.recipe, "--output_dir", str(output_dir), "--max_length", "1024"])
    data = Dataset.from_list([{"messages": m} for m in conversations])
    return build_trainer(recipe, DatasetDict(train=data, validation=data.select(range(2))))


@pytest.mark.slow
def test_labels_cover_exactly_the_replies_and_their_end_of_turn_token(family, trainer, conversations):
    tokenizer = trainer.processing_class
    end_of_turn = tokenizer.convert_tokens_to_ids(family.end_of_turn)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(conversations))])
    for row, messages in enumerate(conversations):
        ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
        real = ids[: int(batch["attention_mask"][row].sum())] if "attention_mask" in batch else ids
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        runs = supervised_runs(labels)
        assert len(runs) == len(replies)
        for (start, end), reply in zip(runs, replies, strict=True):
            assert labels[start:end] == ids[start:end]
            assert ids[end - 1] == end_of_turn
            content = reply.strip() if family.trims else reply
            assert tokenizer.decode(ids[start:end]) == family.reply_opening + content + family.end_of_turn
            assert tokenizer.decode(ids[:start]).endswith(family.reply_header)
        unsupervised = tokenizer.decode([t for t, label in zip(real, labels, strict=False) if label == -100])
        for message in messages:
            if message["role"] != "assistant":
                assert message["content"].strip() in unsupervised
        if family.bos:  # exactly one begin-of-text token, at the start: the trainer adds none to the template's
            bos = tokenizer.convert_tokens_to_ids(family.bos)
            assert real[0] == bos and real.count(bos) == 1
        else:
            assert tokenizer.bos_token is None and tokenizer.pad_token_id not in real


@pytest.mark.slow
def test_4bit_layers_keep_their_gradient_after_an_evaluation_on_cpu(trainer):
    """bitsandbytes repacks 4-bit weights for a CPU inference kernel without backward; training must not use it."""
    layer = trainer.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    x = torch.randn(2, layer.in_features)
    layer.eval()
    with torch.no_grad():
        layer(x)
    layer.train()
    x.requires_grad_(True)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def family_run(family, tmp_path_factory):
    """One short real smoke run of the family's recipe: 16 steps, evaluated before, halfway and at the end."""
    tiny_model_of(family.name)
    output_dir = tmp_path_factory.mktemp(f"smoke-{family.name}") / "out"
    args = ["--output_dir", str(output_dir), "--max_steps", "16", "--eval_steps", "8", "--save_steps", "16"]
    result = run_command([*LAUNCH, "--config", family.recipe, *args])
    assert result.returncode == 0, result.stderr[-3000:]
    (output_dir.parent / "train.log").write_text(result.stdout + result.stderr, encoding="utf-8")
    return output_dir


@pytest.mark.slow
def test_the_smoke_run_audits_its_labels_and_shows_a_marked_sample_first(family, family_run):
    log = (family_run.parent / "train.log").read_text(encoding="utf-8")
    audit = log.index("label audit: 32 samples, loss on each reply and its end-of-turn token only")
    assert f"{family.end_of_turn}]]" in log[audit:]  # the marked sample: a reply and its end-of-turn in brackets
    assert "'loss'" not in log[:audit]  # before any step


@pytest.mark.slow
def test_the_smoke_run_learns(family_run):
    summary = json.loads((family_run / "run_summary.json").read_text(encoding="utf-8"))
    assert summary["global_step"] == 16
    assert summary["eval_loss"]["last"] < summary["eval_loss"]["first"] - 0.5


@pytest.mark.slow
def test_eval_of_the_smoke_run(family_run, tmp_path):
    from sft.evaluation.evaluate import main

    main(
        ["--model_path", str(family_run), "--output_dir", str(tmp_path), "--num_samples", "2", "--max_new_tokens", "4"]
    )
    report = json.loads((tmp_path / "eval_report.json").read_text(encoding="utf-8"))
    assert math.isfinite(report["perplexity"]) and report["perplexity"] > 1


class EndTurnAt(LogitsProcessor):
    """Keep `token_id` out of the new tokens until `position`, then force it there, whatever the model prefers."""

    def __init__(self, token_id: int, position: int):
        self.token_id, self.position = token_id, position

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] < self.position:
            scores[:, self.token_id] = -math.inf
        elif input_ids.shape[1] == self.position:
            scores[:] = -math.inf
            scores[:, self.token_id] = 0
        return scores


@pytest.mark.slow
def test_chat_stops_at_the_end_of_turn_token(family, family_run):
    from sft.common.generation import GenerationArguments, generation_kwargs
    from sft.common.inference import load_model, read_run
    from sft.serving.chat import ChatSession

    run = read_run(str(family_run))
    tokenizer = run.load_tokenizer()
    end_of_turn = tokenizer.convert_tokens_to_ids(family.end_of_turn)
    session = ChatSession(
        load_model(run, device="cpu"),
        tokenizer,
        generation=generation_kwargs(tokenizer, GenerationArguments(max_new_tokens=12, do_sample=False)),
    )
    prompt = session.prompt_ids("你好")
    assert tokenizer.decode(prompt).endswith(family.served_prompt_end or family.reply_header)
    session.generation["logits_processor"] = LogitsProcessorList([EndTurnAt(end_of_turn, len(prompt) + 2)])
    output = session.model.generate(input_ids=torch.tensor([prompt]), **session.generation)[0, len(prompt) :].tolist()
    assert output[-1] == end_of_turn and len(output) == 3  # stopped right at the end-of-turn token
    reply = session.reply("你好")
    assert family.end_of_turn not in reply and session.history[-1] == {"role": "assistant", "content": reply}


@pytest.mark.slow
def test_merge_ships_the_official_template(family, family_run, tmp_path):
    from sft.common.inference import read_run
    from sft.export.merge import main

    merged = tmp_path / "merged"
    main(["--model_path", str(family_run), "--output_dir", str(merged)])
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert tokenizer.chat_template == family.official
    # evaluation of the merged model finds the reply markers again
    assert (
        read_run(str(merged)).load_tokenizer(reply_mask=True).chat_template
        == OUR_TRAINING_TEMPLATES.get(family.official, family.official)  # GLM-4: trained as it is, derived spans
    )


def ending_every_turn(name: str, output_dir):
    """A copy of the family's tiny model whose every next token is its end-of-turn token: all tokens embed alike,
    the layers add nothing, so every position ends in the same hidden state, and only the end-of-turn row of the
    output layer points at it."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_of(name))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_of(name))
    with torch.no_grad():
        model.get_input_embeddings().weight[:] = 1.0
        for parameter_name, parameter in model.named_parameters():
            if parameter_name.endswith(("o_proj.weight", "down_proj.weight")):
                parameter.zero_()
        hidden = model(torch.tensor([[0]]), output_hidden_states=True).hidden_states[-1][0, -1]
        head = model.get_output_embeddings().weight
        head.zero_()
        head[tokenizer.convert_tokens_to_ids(FAMILIES[name].end_of_turn)] = hidden
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


SERVED = [
    {"role": "system", "content": "你是一个友好的聊天伙伴。"},
    {"role": "user", "content": "周末去爬山了吗？"},
    {"role": "assistant", "content": "去了，风景特别好。"},
    {"role": "user", "content": "下次叫上我吧。"},
]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen3", "qwen3_2507", "glm4", "r1_distill"])
def test_serve_renders_the_official_prompt_and_stops_at_the_end_of_turn(name, tmp_path):
    family = FAMILIES[name]
    model_dir = ending_every_turn(name, tmp_path / name)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    official = tokenizer.apply_chat_template(
        SERVED, chat_template=family.official, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert render_prompt(tokenizer, SERVED) == official
    assert official.endswith(family.served_prompt_end or family.reply_header)
    if family.served_prompt_end is None:  # what is served is what is trained (R1's <think> opening aside)
        reply = {"role": "assistant", "content": "好啊，一言为定。"}
        trained = tokenizer.apply_chat_template(
            [*SERVED, reply], chat_template=training_chat_template(tokenizer), tokenize=False, enable_thinking=False
        )
        assert trained.startswith(official)
    with running_server(model_dir, tmp_path / "serve.log") as server:
        response = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"model": server.tuned, "messages": SERVED, "max_tokens": 8, "temperature": 0},
            headers={"Authorization": f"Bearer {server.api_key}"},
            timeout=120,
        )
    assert response.status_code == 200, response.text
    answer = response.json()
    # the one token generated was the end-of-turn token, and the server stopped there
    assert answer["choices"][0]["finish_reason"] == "stop" and answer["usage"]["completion_tokens"] == 1
    assert answer["choices"][0]["message"]["content"] == ""
    assert answer["usage"]["prompt_tokens"] == len(tokenizer(official, add_special_tokens=False)["input_ids"])
    if name == "qwen3":  # non-thinking mode: the empty think block is in the served prompt
        thinking = tokenizer.apply_chat_template(SERVED, tokenize=False, add_generation_prompt=True)
        assert official == thinking + "<think>\n\n</think>\n\n"
