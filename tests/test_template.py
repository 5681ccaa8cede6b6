"""The Llama-2 training template: same text as Meta's format, one <s> per turn, loss on replies only."""

import itertools
import json
from pathlib import Path

import jinja2
import pytest
from datasets import Dataset, DatasetDict
from helpers import SMOKE_RECIPE
from transformers import AutoTokenizer

from sft.common.config import parse_recipe
from sft.common.template import LLAMA2_TRAINING_TEMPLATE, strip_generation_markers, training_chat_template
from sft.data import multi_turn_samples, normalize_utterance, per_turn_samples
from sft.tiny import SAMPLE_DATA
from sft.train.trainer import build_trainer

SYSTEM = "你是一个友好的聊天伙伴，请用自然的中文回答。"
HANDWRITTEN = [
    [{"role": "user", "content": "你好啊"}, {"role": "assistant", "content": "你好！今天过得怎么样？"}],
    [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "周末去哪儿玩了？"},
        {"role": "assistant", "content": "去 爬 山 了 ， 累 死 了"},
        {"role": "user", "content": "  下次叫上我  "},
        {"role": "assistant", "content": "好呀 iPhone 12 拍照很好看 "},
    ],
    [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "在吗"},
        {"role": "assistant", "content": "在"},
    ],
]


def lccc_conversations(path: Path, count: int = 30) -> list[list[dict]]:
    """Real LCCC-format dialogues of one to three turns, every other one with a system prompt."""
    dialogues = json.loads(path.read_text(encoding="utf-8"))["train"][:count]
    real = []
    for i, dialogue in enumerate(dialogues):
        utterances = [normalize_utterance(u) for u in dialogue]
        real += [s["messages"] for s in multi_turn_samples(utterances, 3, SYSTEM if i % 2 else None)]
    assert {sum(m["role"] == "assistant" for m in c) for c in real} >= {1, 2}
    return real


@pytest.fixture(scope="module")
def conversations():
    """Handwritten cases plus dialogues of the LCCC sample shipped with the project."""
    return HANDWRITTEN + lccc_conversations(SAMPLE_DATA)


def meta_llama2_prompt(messages: list[dict], bos: str = "<s>", eos: str = "</s>") -> str:
    """Llama-2-chat's prompt format as Meta publishes it (llama repo, `Llama.chat_completion`), written out apart
    from any Jinja template: the system prompt goes inside the first user turn between `<<SYS>>` lines; each user
    turn is `<s>[INST] {user} [/INST]` and each reply ` {reply} </s>`, contents stripped; roles must alternate."""
    system = None
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    text = ""
    for i, message in enumerate(messages):
        assert message["role"] == ("user" if i % 2 == 0 else "assistant"), "roles must alternate"
        content = message["content"]
        if i == 0 and system is not None:
            content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
        if message["role"] == "user":
            text += f"{bos}[INST] {content.strip()} [/INST]"
        else:
            text += f" {content.strip()} {eos}"
    return text


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def render(template: str, messages, **tokens) -> str:
    env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, bos_token="<s>", eos_token="</s>", **tokens)


def test_training_template_renders_exactly_metas_format(conversations):
    ours = strip_generation_markers(LLAMA2_TRAINING_TEMPLATE)
    assert "generation" not in ours
    for messages in conversations:
        assert render(ours, messages) == meta_llama2_prompt(messages)


def test_transformers_renders_our_template_in_metas_format(conversations, tokenizer):
    for messages in conversations:
        ours = tokenizer.apply_chat_template(messages, chat_template=LLAMA2_TRAINING_TEMPLATE, tokenize=False)
        assert ours == meta_llama2_prompt(messages)


def test_the_official_template_file_renders_metas_format_too(toy_data, reference_template):
    """Extra, where ../shared is at hand: the template Meta ships agrees on the real LCCC toy data as well."""
    for messages in HANDWRITTEN + lccc_conversations(toy_data):
        assert render(reference_template, messages) == meta_llama2_prompt(messages)
        ours = strip_generation_markers(LLAMA2_TRAINING_TEMPLATE)
        assert render(ours, messages) == render(reference_template, messages)


def test_llama2_templates_are_swapped_for_the_training_template(tokenizer):
    tokenizer.chat_template = strip_generation_markers(LLAMA2_TRAINING_TEMPLATE)
    assert training_chat_template(tokenizer) == LLAMA2_TRAINING_TEMPLATE


def test_one_bos_at_the_start_of_each_user_turn(conversations, tokenizer):
    for messages in conversations:
        ids = tokenizer.apply_chat_template(messages, chat_template=LLAMA2_TRAINING_TEMPLATE, return_dict=True)[
            "input_ids"
        ]
        user_turns = sum(m["role"] == "user" for m in messages)
        bos_positions = [i for i, token in enumerate(ids) if token == tokenizer.bos_token_id]
        assert ids[0] == tokenizer.bos_token_id
        assert len(bos_positions) == user_turns
        assert all(b - a > 1 for a, b in itertools.pairwise(bos_positions)), "<s><s> found"
        for position in bos_positions:
            assert tokenizer.decode(ids[position + 1 : position + 4]).startswith("[INST]")


@pytest.fixture(scope="module")
def trainer(conversations, tiny_model, tmp_path_factory):
    """The real trainer of the smoke recipe (4-bit tiny model, LoRA), on the test conversations."""
    output_dir = tmp_path_factory.mktemp("template-run")
    recipe = parse_recipe(["--config", str(SMOKE_RECIPE), "--output_dir", str(output_dir), "--max_length", "1024"])
    data = Dataset.from_list([{"messages": m} for m in conversations])
    return build_trainer(recipe, DatasetDict(train=data, validation=data.select(range(2))))


@pytest.mark.slow
def test_the_smoke_trainer_trains_lora_on_a_4bit_base(trainer):
    import bitsandbytes as bnb

    modules = dict(trainer.model.named_modules())
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in modules.values())
    assert trainer.model.peft_config["default"].r == 16
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def supervised_runs(labels: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each stretch of labels that carries loss."""
    runs, start = [], None
    for i, label in enumerate([*labels, -100]):
        if label != -100 and start is None:
            start = i
        elif label == -100 and start is not None:
            runs.append((start, i))
            start = None
    return runs


@pytest.mark.slow
def test_labels_cover_exactly_the_replies_and_their_eos(trainer, conversations, tokenizer):
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(conversations))])
    for row, messages in enumerate(conversations):
        ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
        replies = [m["content"].strip() for m in messages if m["role"] == "assistant"]
        runs = supervised_runs(labels)
        assert len(runs) == len(replies)
        for (start, end), reply in zip(runs, replies, strict=True):
            assert labels[start:end] == ids[start:end]
            assert ids[end - 1] == tokenizer.eos_token_id
            assert tokenizer.decode(ids[start:end]).strip() == f"{reply} </s>"
            assert tokenizer.decode(ids[:start]).endswith("[/INST]")
        unsupervised = tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label == -100])
        for message in messages:
            if message["role"] != "assistant":
                assert message["content"].strip() in unsupervised


# per_turn samples of two hand-made dialogues: each reply a completion, the earlier turns its prompt
PER_TURN = per_turn_samples(["你好啊", "你好！今天过得怎么样？", "还不错，去爬山了", "下次叫上我"], 2, SYSTEM)
PER_TURN += per_turn_samples(["在吗", "在", "iPhone 12 好用吗", "拍照很好看"], 1)


@pytest.fixture(scope="module")
def per_turn_trainer(tiny_model, tmp_path_factory):
    """The smoke recipe's trainer on prompt/completion samples, as `sample_format: per_turn` gives them."""
    output_dir = tmp_path_factory.mktemp("per-turn-run")
    recipe = parse_recipe(["--config", str(SMOKE_RECIPE), "--output_dir", str(output_dir)])
    data = Dataset.from_list(PER_TURN)
    return build_trainer(recipe, DatasetDict(train=data, validation=data.select(range(2))))


@pytest.mark.slow
def test_per_turn_labels_cover_exactly_the_completion_and_its_eos(per_turn_trainer, tokenizer):
    trainer = per_turn_trainer
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PER_TURN))])
    for row, sample in enumerate(PER_TURN):
        ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
        [(start, end)] = supervised_runs(labels)
        assert labels[start:end] == ids[start:end]
        assert ids[end - 1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids[start:end]).strip() == f"{sample['completion'][0]['content']} </s>"
        assert tokenizer.decode(ids[:start]).endswith("[/INST]")
        assert all(label == -100 for label in labels[end:])  # padding after the end token carries no loss
