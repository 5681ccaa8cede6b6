"""Loading what a run trained, for evaluation, chat and merging: base model + LoRA adapter, or a merged model.

A training run's output folder holds the adapter (`adapter_config.json` names the base model), the tokenizer with
the training chat template and `recipe.yaml`. A merged folder (`lccc-sft merge`) holds a standalone model,
its tokenizer, a copy of `recipe.yaml` and `merge_info.json` naming the base it came from.
"""

import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from trl import ModelConfig

from sft.common.arguments import parse_arguments, read_recipe_file
from sft.common.config import RECIPE_FILE, RUN_SUMMARY, DataArguments, training_default
from sft.common.errors import LOG_FORMAT, UserError
from sft.common.generation import GenerationArguments, chosen_settings, load_generation_defaults
from sft.common.model import NATIVE_BF16_CAPABILITY

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
MERGE_INFO = "merge_info.json"
SELECTION = Path("selection") / "selection.json"  # what `lccc-sft select` chose, inside the run folder
CHECKPOINT_HELP = "A checkpoint of the run: checkpoint-N, final, or selected (the one `lccc-sft select` chose)."


def checkpoint_path(model_path: str, checkpoint: str | None) -> str:
    """The folder of one checkpoint of a run: `checkpoint-N`, `final` (the run folder itself) or `selected`."""
    if checkpoint in (None, "final"):
        return model_path
    if checkpoint == "selected":
        selection = Path(model_path) / SELECTION
        if not selection.is_file():
            raise UserError(f"{model_path} has no {SELECTION}: run `lccc-sft select --model_path {model_path}` first")
        checkpoint = json.loads(selection.read_text(encoding="utf-8"))["selected"]
        if checkpoint is None:
            raise UserError(f"{selection}: no checkpoint met the forgetting budget; see selection.md beside it")
        return checkpoint_path(model_path, checkpoint)
    path = Path(model_path) / checkpoint
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"--checkpoint {checkpoint}: {path} holds no adapter (adapter_config.json)")
    return str(path)


@dataclass
class TrainedModelArguments:
    """Which trained model a command loads, and where."""

    model_path: str = field(metadata={"help": "Training output folder (adapter) or a merged model folder."})
    base_model: str | None = field(
        default=None, metadata={"help": "Base model folder or Hub id (default: the one the adapter names)."}
    )
    no_quantize: bool = field(
        default=False, metadata={"help": "Load the base unquantized instead of 4-bit as in training."}
    )
    device: str | None = field(default=None, metadata={"help": "cuda, cuda:1, cpu (default: cuda when available)."})
    checkpoint: str | None = field(default=None, metadata={"help": CHECKPOINT_HELP})

    def __post_init__(self):
        self.model_path = checkpoint_path(self.model_path, self.checkpoint)
        check_device(self.device)

    @property
    def quantize(self) -> bool | None:
        """None follows the recipe (4-bit when training was); False loads the base unquantized."""
        return False if self.no_quantize else None


def check_device(device: str | None) -> None:
    """A device this machine has: `cuda` without a GPU (or `cuda:3` on a two-GPU machine) fails before loading."""
    if device is None:
        return
    try:
        where = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device}: use cpu, cuda or cuda:N") from None
    if where.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: this machine has no CUDA GPU (use --device cpu)")
    if where.type == "cuda" and where.index is not None and where.index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")


def read_json(path: Path) -> dict:
    """A small JSON file of a run (adapter_config.json, merge_info.json), or one line saying it is damaged."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise UserError(f"{path} cannot be read ({str(err).splitlines()[0]}): it is damaged or not JSON") from None


def check_adapter_weights(path: Path) -> None:
    """The adapter's weights read back whole (the safetensors header describes the file's bytes), before any
    model is loaded: a truncated copy is named here, not deep inside peft."""
    from safetensors import SafetensorError, safe_open

    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        if not (path / "adapter_model.bin").is_file():
            raise UserError(f"{path} has adapter_config.json but no adapter weights (adapter_model.safetensors)")
        return
    try:
        with safe_open(weights, "pt") as opened:
            opened.keys()
    except (SafetensorError, OSError) as err:
        raise UserError(f"{weights} is damaged ({str(err).splitlines()[0]}); copy or train the run again") from None


def resolve_local(name: str | None) -> str | None:
    """A recipe path as the user meant it: relative to the current folder, else to the repository root.

    Recipes name `build/tiny-llama` or `sft/assets/lccc_sample.json` relative to the repository root (where
    make runs); this lets the commands run from anywhere. Hub ids and absolute paths pass through unchanged.
    """
    if not name or Path(name).exists() or Path(name).is_absolute():
        return name
    at_root = ROOT / name
    return str(at_root) if at_root.exists() else name


def parse_generating_command(command_arguments, argv: list[str], prog: str) -> tuple:
    """Parse a command that generates from a trained run: which run, the command's own arguments, and the
    generation settings, which start from the run's saved `generation_config.json` (flags win)."""
    parsed = parse_arguments((TrainedModelArguments, command_arguments, GenerationArguments), argv, prog=prog)
    where, args, settings = parsed.values
    return where, args, load_generation_defaults(where.model_path, chosen_settings(settings, parsed.chosen))


@dataclass
class Run:
    """What is needed to rebuild a trained model and its held-out data."""

    model_path: Path
    is_adapter: bool
    base_model: str | None
    recipe: dict = field(default_factory=dict)
    data: DataArguments | None = None
    model_args: ModelConfig | None = None
    seed: int = training_default("seed")
    max_length: int = training_default("max_length")
    trust_remote_code: bool = False

    @property
    def quantized_in_training(self) -> bool:
        return bool(self.model_args and (self.model_args.load_in_4bit or self.model_args.load_in_8bit))

    def loads_quantized(self, quantize: bool | None) -> bool:
        """Whether the base loads quantized: as in training unless `quantize` says otherwise."""
        return self.is_adapter and self.quantized_in_training and (quantize is None or quantize)

    def load_tokenizer(self, reply_mask: bool = False):
        """The run's tokenizer with its reply-marking chat template (markers are no-ops when generating).

        A training output folder holds the training template; a merged folder holds the plain one, which gets its
        markers back here. Only `reply_mask` (perplexity) insists on them.
        """
        from sft.common.model import load_tokenizer

        return load_tokenizer(
            str(self.model_path), trust_remote_code=self.trust_remote_code, need_reply_markers=reply_mask
        )


def recipe_part(cls, recipe: dict, where: Path):
    """The recipe's keys for one dataclass, parsed as training parsed them; other keys are left alone."""
    try:
        return parse_arguments((cls,), recipe=recipe, ignore_unknown_keys=True).values[0]
    except UserError as err:
        raise UserError(f"{where}: {err}") from None


def read_run(model_path: str, base_model: str | None = None) -> Run:
    """Describe a training output folder (adapter) or a merged model folder, without loading any weights.

    Only the recipe's data and model keys (plus `seed`, `max_length`, `trust_remote_code`) are read: the
    training keys describe the training machine (bf16, optimizer, ...) and must not stop an evaluation elsewhere.
    """
    path = Path(model_path)
    if not path.is_dir():
        raise UserError(
            f"model path not found: {model_path} (give the output folder of a training run; `make sft` writes "
            "output/smoke)"
        )
    is_adapter = (path / "adapter_config.json").is_file()
    if not is_adapter and not (path / "config.json").is_file():
        raise UserError(
            f"{model_path} holds neither a LoRA adapter (adapter_config.json) nor a model (config.json); "
            "give the output folder of a training run or of `lccc-sft merge`"
        )
    recipe_path = path / RECIPE_FILE
    if not recipe_path.is_file() and path.name.startswith("checkpoint-"):
        recipe_path = path.parent / RECIPE_FILE  # a checkpoint inside a run's output folder
    recipe = read_recipe_file(str(recipe_path)) if recipe_path.is_file() else {}

    if is_adapter:
        adapter_config = read_json(path / "adapter_config.json")
        check_adapter_weights(path)
    if base_model is None and is_adapter:
        base_model = adapter_config.get("base_model_name_or_path") or recipe.get("model_name_or_path")
    elif base_model is None and (path / MERGE_INFO).is_file():
        base_model = read_json(path / MERGE_INFO).get("base_model")
    if is_adapter and not base_model:
        raise UserError(f"{model_path}/adapter_config.json names no base model; give it with --base_model")
    if is_adapter:
        from sft.common.model import check_model_source

        check_model_source(resolve_local(base_model))

    data = None
    if recipe.get("dataset_name") or recipe.get("datasets"):
        data = recipe_part(DataArguments, recipe, recipe_path)
        data.dataset_name = resolve_local(data.dataset_name)
        for source in data.datasets or []:  # a mixture's sources
            source["path"] = resolve_local(source["path"])
    model_name = resolve_local(base_model) if base_model else str(path)
    model_values = {**recipe, **trained_precision(path), "model_name_or_path": model_name}
    model_args = recipe_part(ModelConfig, model_values, recipe_path)
    return Run(
        model_path=path,
        is_adapter=is_adapter,
        base_model=resolve_local(base_model) if base_model else None,
        recipe=recipe,
        data=data,
        model_args=model_args,
        seed=int(recipe.get("seed", training_default("seed"))),
        max_length=int(recipe.get("max_length") or training_default("max_length")),
        trust_remote_code=bool(recipe.get("trust_remote_code", False)),
    )


def trained_precision(path: Path) -> dict:
    """`{"dtype": ...}` as the run trained (the launcher may have changed the recipe's: fp16 on a T4), if known."""
    summary_path = path / RUN_SUMMARY
    if not summary_path.is_file() and path.name.startswith("checkpoint-"):
        summary_path = path.parent / RUN_SUMMARY
    dtype = json.loads(summary_path.read_text(encoding="utf-8")).get("dtype") if summary_path.is_file() else None
    return {"dtype": dtype} if dtype else {}


def without_emulated_bf16(dtype, device: str):
    """fp16 in place of bf16 on a GPU that only emulates bf16 (compute capability below 8.0: T4, V100), as
    training there does (sft/train/plan.py); any other dtype or device as it is."""
    if dtype != torch.bfloat16 or not device.startswith("cuda"):
        return dtype
    return dtype if torch.cuda.get_device_capability(torch.device(device)) >= NATIVE_BF16_CAPABILITY else torch.float16


def start_command_logging() -> None:
    """INFO logs in the project's format, and only what matters: peft's deprecation notice and matplotlib's font
    log go."""
    logging.basicConfig(format=LOG_FORMAT, level=logging.INFO)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_dtype(name) -> torch.dtype | str:
    if name in (None, "auto"):
        return "auto"
    if isinstance(name, torch.dtype):
        return name
    try:
        return getattr(torch, name)
    except AttributeError:
        raise UserError(f"unknown dtype {name!r}: use float32, bfloat16, float16 or auto") from None


def load_base(run: Run, quantize: bool, device: str, dtype=None):
    """The base model the adapter was trained from: 4-bit as in training when `quantize`, else unquantized."""
    from transformers import AutoModelForCausalLM
    from trl import get_quantization_config

    from sft.common.model import check_model_source, hub_error_message

    name = run.model_args.model_name_or_path
    check_model_source(name)
    dtype = without_emulated_bf16(torch_dtype(dtype if dtype is not None else run.model_args.dtype), device)
    quantization_config = get_quantization_config(run.model_args) if quantize else None
    how = "4-bit" if quantization_config and run.model_args.load_in_4bit else "8-bit" if quantization_config else ""
    logger.info("loading base model %s (%s) on %s", name, f"{how} {str(dtype).removeprefix('torch.')}".strip(), device)
    try:
        return AutoModelForCausalLM.from_pretrained(
            name,
            revision=run.model_args.model_revision,
            dtype=dtype,
            quantization_config=quantization_config,
            attn_implementation=run.model_args.attn_implementation,
            trust_remote_code=run.trust_remote_code,
            device_map={"": device},
        )
    except OSError as err:
        raise UserError(hub_error_message(name, err)) from None


def load_model(run: Run, quantize: bool | None = None, device: str | None = None, dtype=None):
    """The trained model for inference: base + adapter (a PeftModel), or the merged model as saved.

    `quantize=None` follows the recipe (4-bit when training was 4-bit); a merged model always loads unquantized.
    """
    device = device or default_device()
    if run.is_adapter:
        from peft import PeftModel

        base = load_base(run, run.loads_quantized(quantize), device, dtype)
        logger.info("loading adapter from %s", run.model_path)
        model = PeftModel.from_pretrained(base, run.model_path)
    else:
        from transformers import AutoModelForCausalLM

        logger.info("loading model %s on %s", run.model_path, device)
        model = AutoModelForCausalLM.from_pretrained(
            run.model_path, dtype=torch_dtype(dtype), trust_remote_code=run.trust_remote_code, device_map={"": device}
        )
    model.eval()
    return model


def quantization_label(run: Run, quantize: bool | None) -> str:
    """How the base weights were held: `4-bit nf4`, `8-bit` or `none`."""
    if not run.loads_quantized(quantize):
        return "none"
    if run.model_args.load_in_4bit:
        nested = " + double quantization" if run.model_args.use_bnb_nested_quant else ""
        return f"4-bit {run.model_args.bnb_4bit_quant_type}{nested}"
    return "8-bit"


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The chat template up to where the assistant's reply starts (Llama-2: ends with `[/INST]`).

    Hybrid-thinking templates (Qwen3) render in non-thinking mode, with the empty think block training left out of
    the loss: what is served is what was trained. Other templates ignore `enable_thinking`.
    """
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)


def encode_prompt(tokenizer, prompt: str | list[str], **kwargs):
    """Tokenize rendered prompts: they already hold `<s>`, so no special tokens are added (never `<s><s>`)."""
    return tokenizer(prompt, add_special_tokens=False, **kwargs)
