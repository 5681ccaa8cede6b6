"""Export a trained run to GGUF for llama.cpp, Ollama and LM Studio, with its chat template and stop tokens.

lccc-sft export-gguf --model_path output/smoke [--quantization q8_0] [--output_dir output/smoke-gguf]
(or `make export-gguf MODEL_PATH=output/smoke ARGS="--quantization q8_0"`, which also sets up the converter).

A training output folder is first merged into its unquantized base exactly as `lccc-sft merge` does; a
merged folder is converted as it is. The conversion is llama.cpp's own `convert_hf_to_gguf.py` (fetched into
build/llama.cpp by `make export-setup`), so the GGUF carries the tokenizer, BOS/EOS and the chat template in
its inference form. The file is read back and checked before the output folder appears; next to it goes an
Ollama `Modelfile` whose TEMPLATE, SYSTEM and stop lines say the same as the run's chat template.
"""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sft.common.arguments import parse_arguments
from sft.common.errors import UserError, exits_cleanly_on_user_error
from sft.common.generation import GenerationArguments, load_generation_defaults
from sft.common.inference import ROOT, read_run, start_command_logging
from sft.common.template import inference_chat_template, is_llama2_chat_template
from sft.export.merge import MergeArguments, check_output_dir, merge

logger = logging.getLogger(__name__)
EXPORT_INFO = "export_info.json"
MODELFILE = "Modelfile"
CONVERTER = ROOT / "build" / "llama.cpp" / "convert_hf_to_gguf.py"
# llama.cpp's own programs, built by `make llama-cpp` from the same source release.
LLAMA_CPP_BIN = ROOT / "build" / "llama.cpp-build" / "bin"
# The converter's own output types (`--outtype`), less `auto` and the ternary tq1_0/tq2_0 meant for BitNet models.
CONVERTER_TYPES = ("f16", "bf16", "q8_0", "f32")
# llama-quantize's 4-6 bit K-quants, made from the f16 file.
K_QUANTS = ("q4_k_m", "q5_k_m", "q6_k")
QUANTIZATIONS = CONVERTER_TYPES + K_QUANTS
# The byte-level BPE pre-tokenizers for which llama.cpp adds a BOS when the GGUF does not say (src/llama-vocab.cpp).
LLAMA_CPP_BOS_PRE_TOKENIZERS = (
    "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano",
    "viking", "jais", "tekken", "exaone", "exaone4", "exaone-moe", "chameleon",
)  # fmt: skip
# The converter's message for a BPE tokenizer whose check-text hash is not in its list (get_vocab_base_pre).
UNKNOWN_PRE_TOKENIZER = "BPE pre-tokenizer was not recognized"


@dataclass(frozen=True)
class OllamaFormat:
    """How one chat-template family reads as an Ollama Go template, and the text that must stop a reply.

    `template` renders Ollama's `.System` and `.Messages` to the text the family's Jinja template renders with
    `add_generation_prompt=True` (ending where the reply starts), less the leading BOS that llama.cpp adds itself
    for a GGUF whose `add_bos_token` is true. `stops` are the end-of-turn token and the format's own markers.
    A new family is one entry here; tests/test_export_gguf.py renders it through Go's text/template.
    """

    family: str
    matches: Callable[[str], bool]  # whether a Jinja chat template is of this family
    template: str
    stops: tuple[str, ...]


# What Qwen2.5's template writes as the system turn when a conversation has none.
QWEN2_5_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# The lines Llama-3.1's template writes at the start of every system turn, with its default `date_string`.
LLAMA3_1_KNOWLEDGE, LLAMA3_1_DATE = "Cutting Knowledge Date: December 2023", "26 Jul 2024"
# Qwen3's turns (no default system prompt), up to the generation prompt's `<|im_start|>assistant` line.
QWEN3_CHAT = (
    "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    '{{ range .Messages }}{{ if ne .Role "system" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
    "{{ end }}{{ end }}<|im_start|>assistant\n"
)
OLLAMA_FORMATS = (
    OllamaFormat(
        family="llama-2",
        matches=is_llama2_chat_template,
        template=(
            '{{- $first := true }}{{ range .Messages }}{{ if eq .Role "user" }}{{ if not $first }}<s>{{ end }}'
            "[INST] {{ if and $first $.System }}<<SYS>>\n{{ $.System }}\n<</SYS>>\n\n{{ end }}{{ .Content }} [/INST]"
            '{{ $first = false }}{{ else if eq .Role "assistant" }} {{ .Content }} </s>{{ end }}{{ end }}'
        ),
        stops=("</s>", "[INST]", "[/INST]", "<<SYS>>"),
    ),
    OllamaFormat(
        family="qwen2.5",
        matches=lambda template: "<|im_start|>" in template and QWEN2_5_DEFAULT_SYSTEM in template,
        template=(
            "<|im_start|>system\n{{ if .System }}{{ .System }}{{ else }}" + QWEN2_5_DEFAULT_SYSTEM + "{{ end }}"
            '<|im_end|>\n{{ range .Messages }}{{ if ne .Role "system" }}<|im_start|>{{ .Role }}\n{{ .Content }}'
            "<|im_end|>\n{{ end }}{{ end }}<|im_start|>assistant\n"
        ),
        stops=("<|im_end|>", "<|im_start|>"),
    ),
    OllamaFormat(
        family="llama-3.1",
        matches=lambda template: (
            "<|eot_id|>" in template and LLAMA3_1_KNOWLEDGE in template and f'"{LLAMA3_1_DATE}"' in template
        ),
        template=(
            f"<|start_header_id|>system<|end_header_id|>\n\n{LLAMA3_1_KNOWLEDGE}\nToday Date: {LLAMA3_1_DATE}\n\n"
            "{{ .System }}"
            '<|eot_id|>{{ range .Messages }}{{ if ne .Role "system" }}<|start_header_id|>{{ .Role }}'
            "<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}{{ end }}"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
        stops=("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"),
    ),
    OllamaFormat(  # served in non-thinking mode, as trained: the generation prompt writes the empty think block
        family="qwen3",
        matches=lambda template: "<|im_start|>" in template and "enable_thinking" in template,
        template=QWEN3_CHAT + "<think>\n\n</think>\n\n",
        stops=("<|im_end|>", "<|im_start|>"),
    ),
    OllamaFormat(  # Qwen3-Instruct-2507: Qwen's ChatML and tool turns, no thinking mode, no default system prompt
        family="qwen3-instruct-2507",
        matches=lambda template: (
            "<|im_start|>" in template
            and "<tool_response>" in template
            and not ("enable_thinking" in template or QWEN2_5_DEFAULT_SYSTEM in template)
        ),
        template=QWEN3_CHAT,
        stops=("<|im_end|>", "<|im_start|>"),
    ),
    OllamaFormat(  # GLM-4-0414: no end-of-turn token, a reply ends where the next <|user|> begins
        family="glm-4",
        matches=lambda template: "[gMASK]<sop>" in template and "<|assistant|>" in template,
        template=(
            "[gMASK]<sop>{{ if .System }}<|system|>\n{{ .System }}{{ end }}{{ range .Messages }}"
            '{{ if eq .Role "user" }}<|user|>\n{{ .Content }}{{ else if eq .Role "assistant" }}<|assistant|>\n'
            "{{ .Content }}{{ end }}{{ end }}<|assistant|>"
        ),
        stops=("<|user|>", "<|observation|>"),
    ),
    OllamaFormat(  # DeepSeek-R1-Distill: its generation prompt opens a think block
        family="deepseek-r1-distill",
        matches=lambda template: "<｜Assistant｜>" in template and "<｜end▁of▁sentence｜>" in template,
        template=(
            '{{ .System }}{{ range .Messages }}{{ if eq .Role "user" }}<｜User｜>{{ .Content }}'
            '{{ else if eq .Role "assistant" }}<｜Assistant｜>{{ .Content }}<｜end▁of▁sentence｜>{{ end }}{{ end }}'
            "<｜Assistant｜><think>\n"
        ),
        stops=("<｜end▁of▁sentence｜>", "<｜User｜>"),
    ),
)


@dataclass
class ExportArguments(MergeArguments):
    """The merge's arguments (for a training output folder), plus the GGUF type and the Modelfile's system prompt."""

    model_path: str = field(metadata={"help": "A training output folder (LoRA adapter) or a merged model folder."})
    output_dir: str | None = field(
        default=None, metadata={"help": "Where the GGUF and the Modelfile go (default: <model_path>-gguf)."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an earlier export in --output_dir."})
    quantization: str = field(
        default="f16",
        metadata={
            "help": f"GGUF weight type: {', '.join(CONVERTER_TYPES)} (llama.cpp's converter) or {', '.join(K_QUANTS)} "
            "(its llama-quantize, built by `make llama-cpp`)."
        },
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "The Modelfile's SYSTEM line (default: the recipe's system_prompt, if any)."}
    )
    converter: str = field(default=str(CONVERTER), metadata={"help": "llama.cpp's convert_hf_to_gguf.py."})
    llama_quantize: str = field(
        default=str(LLAMA_CPP_BIN / "llama-quantize"), metadata={"help": "llama.cpp's llama-quantize (K-quants)."}
    )


def check_quantization(quantization: str, llama_quantize: str) -> str:
    if quantization not in QUANTIZATIONS:
        raise UserError(f"--quantization {quantization}: choose one of {', '.join(QUANTIZATIONS)}")
    if quantization in K_QUANTS and not Path(llama_quantize).is_file():
        raise UserError(f"--quantization {quantization} needs llama.cpp's llama-quantize: run `make llama-cpp`")
    return quantization


def check_converter(converter: str) -> Path:
    path = Path(converter)
    if not path.is_file():
        raise UserError(f"llama.cpp's converter is not at {path}: run `make export-setup` (make export-gguf does)")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError("the `gguf` package is missing: run `make export-setup` (make export-gguf does)") from None
    return path


def ollama_format(chat_template: str) -> OllamaFormat:
    for fmt in OLLAMA_FORMATS:
        if fmt.matches(chat_template):
            return fmt
    families = ", ".join(fmt.family for fmt in OLLAMA_FORMATS)
    raise UserError(f"no Ollama template for this run's chat template (known: {families}); add it to OLLAMA_FORMATS")


def ollama_parameters(settings: GenerationArguments, context_length: int) -> dict:
    """The run's generation settings under Ollama's PARAMETER names (greedy decoding is temperature 0), with the
    context the run was trained on."""
    return {
        "temperature": settings.temperature if settings.do_sample else 0,
        "top_p": settings.top_p,
        "top_k": settings.top_k,  # 0: off, in llama.cpp's sampler as in transformers
        "repeat_penalty": settings.repetition_penalty,
        "num_predict": settings.max_new_tokens,
        "num_ctx": context_length,
    }


def modelfile(gguf_name: str, fmt: OllamaFormat, system_prompt: str | None, parameters: dict) -> str:
    """An Ollama Modelfile: the GGUF next to it, the family's template, the run's system prompt, generation
    settings and stops."""
    lines = [
        f"# Ollama Modelfile ({fmt.family} chat format), written by lccc-sft export-gguf",
        f"FROM ./{gguf_name}",
    ]
    lines.append(f'TEMPLATE """{fmt.template}"""')
    if system_prompt:
        lines.append(f'SYSTEM """{system_prompt}"""')
    lines += [f"PARAMETER {name} {value}" for name, value in parameters.items()]
    lines += [f'PARAMETER stop "{stop}"' for stop in fmt.stops]
    return "\n".join(lines) + "\n"


def space_prefix_after_special_tokens(tokenizer) -> bool | None:
    """Whether the run's SentencePiece-style tokenizer puts "▁" before text that follows a special token (None: not
    such a tokenizer). Its Metaspace `prepend_scheme` "first" puts it only at the start of the text, "always"
    before every piece; llama.cpp's `add_space_prefix` puts it after every special token or nowhere."""
    from tokenizers.pre_tokenizers import Metaspace

    pre_tokenizer = tokenizer.backend_tokenizer.pre_tokenizer
    return pre_tokenizer.prepend_scheme == "always" if isinstance(pre_tokenizer, Metaspace) else None


def converter_input(source: Path, folder: Path, tokenizer) -> Path:
    """`source`'s files linked into `folder`, with a tokenizer_config.json whose `add_prefix_space` the converter
    writes as the GGUF's `tokenizer.ggml.add_space_prefix` (else llama.cpp defaults to a "▁" after every special
    token, which training never saw)."""
    folder.mkdir(parents=True)
    for path in source.iterdir():
        (folder / path.name).symlink_to(path.resolve(), target_is_directory=path.is_dir())
    space_prefix = space_prefix_after_special_tokens(tokenizer)
    if space_prefix is not None:
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
        config_path.unlink(missing_ok=True)
        config_path.write_text(json.dumps({**config, "add_prefix_space": space_prefix}), encoding="utf-8")
    return folder


def merge_scores(tokenizer, tokens: list[str]) -> dict[int, float]:
    """Scores under which llama.cpp's SentencePiece merging follows the run's BPE merge order: minus the rank of
    the first merge that makes each token, as in a SentencePiece BPE model."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    ids = {token: token_id for token_id, token in enumerate(tokens)}
    scores = {}
    for rank, pair in enumerate(model.get("merges", [])):
        left, right = pair.split(" ", 1) if isinstance(pair, str) else pair
        token_id = ids.get(left + right)
        if token_id is not None:
            scores.setdefault(token_id, -float(rank))
    return scores


def write_merge_scores(path: Path, tokenizer) -> None:
    """Write the run's merge order as a SentencePiece-type GGUF's token scores: without a tokenizer.model (which
    transformers 5.x no longer saves) the converter writes -1000 for every token (LlamaHfVocab.get_token_score)."""
    from gguf import GGUFReader

    reader = GGUFReader(path, "r+")
    model = reader.fields.get("tokenizer.ggml.model")
    if model is None or model.contents() != "llama":  # scores matter to SentencePiece-type vocabularies only
        return
    field = reader.fields["tokenizer.ggml.scores"]
    for token_id, score in merge_scores(tokenizer, reader.fields["tokenizer.ggml.tokens"].contents()).items():
        field.parts[field.data[token_id]][0] = score  # a view into the file's memory map
    reader.data.flush()


def convert(model_dir: Path, outfile: Path, quantization: str, converter: Path) -> None:
    """Run llama.cpp's converter; its failure becomes one line naming its last message."""
    command = [sys.executable, str(converter), str(model_dir), "--outfile", str(outfile), "--outtype", quantization]
    logger.info("converting %s to GGUF %s with %s", model_dir, quantization, converter)
    result = subprocess.run(command, capture_output=True, text=True)
    if UNKNOWN_PRE_TOKENIZER in result.stderr:
        check_hash = re.search(r"chkhsh:\s*([0-9a-f]+)", result.stderr)
        raise UserError(
            "llama.cpp's converter does not recognise this tokenizer: it identifies a byte-level BPE tokenizer by "
            f"the hash of its tokens for a check text ({check_hash.group(1) if check_hash else 'unknown'}) and knows "
            "only published ones (Llama-3/3.1 as llama-bpe, Qwen2/2.5 as qwen2), not a retrained tokenizer such as "
            "the tiny smoke models'"
        )
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        raise UserError(
            f"llama.cpp's converter failed (exit {result.returncode}): {lines[-1] if lines else 'no message'}"
        )


def quantize(f16_file: Path, outfile: Path, quantization: str, llama_quantize: str) -> None:
    """llama.cpp's llama-quantize from the f16 file; its failure becomes one line naming its last message."""
    logger.info("quantizing to %s with %s", quantization, llama_quantize)
    command = [llama_quantize, str(f16_file), str(outfile), quantization.upper()]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        raise UserError(f"llama-quantize failed (exit {result.returncode}): {lines[-1] if lines else 'no message'}")


def read_gguf_metadata(path: Path) -> dict:
    """The GGUF's scalar and string metadata, plus the vocabulary under `tokenizer.ggml.tokens`."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    keep = ("tokenizer.ggml.tokens",)
    return {
        name: value.contents()
        for name, value in reader.fields.items()
        if name in keep or not name.startswith("tokenizer.ggml.") or len(value.data) == 1
    }


def llama_cpp_adds_bos(metadata: dict) -> bool:
    """Whether llama.cpp prepends a BOS to a prompt: the GGUF's `add_bos_token`, else its default for the vocabulary
    type and pre-tokenizer (llama_vocab::impl::load in src/llama-vocab.cpp)."""
    written = metadata.get("tokenizer.ggml.add_bos_token")
    if written is not None:
        return written
    model, pre = metadata.get("tokenizer.ggml.model"), metadata.get("tokenizer.ggml.pre")
    return model in ("llama", "bert") or (model == "gpt2" and pre in LLAMA_CPP_BOS_PRE_TOKENIZERS)


def gguf_end_tokens(metadata: dict) -> list[str]:
    """The GGUF's end and end-of-turn tokens: llama.cpp stops at either (its GLM-4 conversion makes `<|endoftext|>`
    the end token and `<|user|>`, where a GLM-4 reply ends, the end-of-turn token)."""
    tokens = metadata.get("tokenizer.ggml.tokens", [])
    ids = [metadata.get(f"tokenizer.ggml.{kind}_token_id") for kind in ("eos", "eot")]
    return [tokens[i] for i in ids if i is not None and i < len(tokens)]


def check_gguf(path: Path, tokenizer, chat_template: str) -> dict:
    """Read the GGUF back: its chat template and special tokens must be the run's, else nothing is published."""
    metadata = read_gguf_metadata(path)
    tokens = metadata["tokenizer.ggml.tokens"]
    problems = []
    if metadata.get("tokenizer.chat_template") != chat_template:
        problems.append("its chat template is not the run's inference template")
    if tokenizer.bos_token is None and llama_cpp_adds_bos(metadata):  # Qwen2.5 has no begin-of-text token
        problems.append("llama.cpp would add a bos token the run does not have")
    for kind in ("bos", "eos"):
        token_id = metadata.get(f"tokenizer.ggml.{kind}_token_id")
        expected = getattr(tokenizer, f"{kind}_token")
        if expected is None:
            continue
        if kind == "eos":
            found = gguf_end_tokens(metadata)
        else:
            found = [tokens[token_id]] if token_id is not None and token_id < len(tokens) else []
        if expected not in found:
            problems.append(f"its {kind} token is not {expected!r}")
    if problems:
        raise UserError(f"the converted GGUF does not match the run: {'; '.join(problems)}")
    return metadata


def export(args: ExportArguments) -> dict:
    run = read_run(args.model_path, args.base_model)
    quantization = check_quantization(args.quantization, args.llama_quantize)
    converter = check_converter(args.converter)
    out = Path(args.output_dir or f"{str(args.model_path).rstrip('/')}-gguf")
    check_output_dir(out, run.model_path, args.overwrite, EXPORT_INFO)
    tokenizer = run.load_tokenizer()
    chat_template = inference_chat_template(tokenizer.chat_template)  # what the merge writes and the GGUF carries
    fmt = ollama_format(chat_template)
    system_prompt = run.recipe.get("system_prompt") if args.system_prompt is None else args.system_prompt
    gguf_name = f"model-{quantization}.gguf"

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        started = time.monotonic()
        source = run.model_path
        if run.is_adapter:
            source = staging / "merged"
            merge(str(run.model_path), str(source), args.dtype, args.device, args.base_model)
        outtype = "f16" if quantization in K_QUANTS else quantization  # K-quants are made from the f16 file
        converted = staging / f"model-{outtype}.gguf"
        # The converter names the model after its folder.
        convert(converter_input(source, staging / "input" / source.name, tokenizer), converted, outtype, converter)
        write_merge_scores(converted, tokenizer)
        shutil.rmtree(staging / "input")
        if quantization in K_QUANTS:
            quantize(converted, staging / gguf_name, quantization, args.llama_quantize)
            converted.unlink()
        check_gguf(staging / gguf_name, tokenizer, chat_template)
        if run.is_adapter:
            shutil.rmtree(source)
        parameters = ollama_parameters(load_generation_defaults(run.model_path), run.max_length)
        (staging / MODELFILE).write_text(modelfile(gguf_name, fmt, system_prompt, parameters), encoding="utf-8")
        info = {
            "model_path": str(run.model_path),
            "base_model": run.base_model,
            "gguf": gguf_name,
            "quantization": quantization,
            "chat_format": fmt.family,
            "bytes": (staging / gguf_name).stat().st_size,
            "seconds": round(time.monotonic() - started, 1),
        }
        (staging / EXPORT_INFO).write_text(json.dumps(info, ensure_ascii=False, indent=2), encoding="utf-8")
        os.chmod(staging, 0o755)  # mkdtemp's 0700 would hide the export from other users
        if out.exists():  # an earlier export or an empty folder: check_output_dir allowed nothing else
            os.replace(out, staging.with_name(staging.name + ".old"))
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(staging.with_name(staging.name + ".old"), ignore_errors=True)
    logger.info("GGUF (%s, %.1f MB) and Modelfile written to %s", quantization, info["bytes"] / 1e6, out)
    return {**info, "output_dir": str(out)}


@exits_cleanly_on_user_error
def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_arguments(
        (ExportArguments,), sys.argv[1:] if argv is None else argv, prog="lccc-sft export-gguf"
    ).values
    start_command_logging()
    info = export(args)
    print(f"GGUF {info['quantization']} ({info['bytes'] / 1e6:.1f} MB) and Modelfile written to {info['output_dir']}")
    return info


if __name__ == "__main__":
    main()
