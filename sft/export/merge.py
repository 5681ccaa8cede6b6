"""Merge a trained LoRA adapter into its base model and save a standalone model that needs no peft.

lccc-sft merge --model_path output/smoke --output_dir output/smoke-merged [--dtype bfloat16]

The adapter was trained on a 4-bit base, but merging into 4-bit weights is lossy: the base is reloaded
unquantized (bf16, or fp16 on a GPU without bf16; a float32 base, or any base on CPU, keeps its own dtype) and
the adapter's update is added to those weights. The merged folder holds the model (safetensors), the tokenizer
with the inference chat template, a copy of `recipe.yaml` and `merge_info.json`; it loads with
`AutoModelForCausalLM.from_pretrained` or `pipeline("text-generation", model=...)`.
"""

import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sft.common.arguments import parse_arguments
from sft.common.config import RECIPE_FILE
from sft.common.errors import UserError, exits_cleanly_on_user_error
from sft.common.files import check_not_inside, check_writable_folder, reporting_full_disk, write_atomically
from sft.common.generation import load_generation_defaults, save_generation_config
from sft.common.inference import (
    CHECKPOINT_HELP,
    MERGE_INFO,
    check_device,
    checkpoint_path,
    default_device,
    load_base,
    quantization_label,
    read_run,
    start_command_logging,
    torch_dtype,
    without_emulated_bf16,
)
from sft.train.checkpoints import FINISHED_MARKER

logger = logging.getLogger(__name__)
COPIED_FILES = (RECIPE_FILE, "trainer_state.json", FINISHED_MARKER)
HALF_DTYPES = (torch.bfloat16, torch.float16)
PROBE = [{"role": "user", "content": "你好，最近怎么样？"}]


def stored_dtype(run) -> torch.dtype:
    """The dtype the base checkpoint is stored in (config `dtype`), float32 when it does not say."""
    from transformers import AutoConfig

    from sft.common.model import hub_error_message

    args = run.model_args
    try:
        config = AutoConfig.from_pretrained(
            args.model_name_or_path, revision=args.model_revision, trust_remote_code=run.trust_remote_code
        )
    except OSError as err:
        raise UserError(hub_error_message(args.model_name_or_path, err)) from None
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return torch_dtype(dtype) if isinstance(dtype, str) else (dtype or torch.float32)


def merge_dtype(run, device: str, requested: str | None) -> torch.dtype:
    """bf16/fp16 on a GPU for a half-precision base; the base's own dtype on CPU or for a float32 base."""
    if requested and requested != "auto":
        dtype = torch_dtype(requested)
        if dtype not in (torch.float32, *HALF_DTYPES):
            raise UserError(f"--dtype {requested}: merge into float32, bfloat16 or float16")
        return dtype
    own = stored_dtype(run)
    if not device.startswith("cuda") or own == torch.float32:
        return own
    trained = torch_dtype(run.model_args.dtype) if run.model_args.dtype not in (None, "auto") else None
    return without_emulated_bf16(trained if trained in HALF_DTYPES else torch.bfloat16, device)


@torch.no_grad()
def probe_logits(model, tokenizer) -> torch.Tensor:
    from sft.common.inference import encode_prompt, render_prompt

    batch = encode_prompt(tokenizer, render_prompt(tokenizer, PROBE), return_tensors="pt").to(model.device)
    return model(**batch).logits.float().cpu()


def check_output_dir(output_dir: Path, model_path: Path, overwrite: bool, marker: str = MERGE_INFO) -> None:
    """Refuse to write into the run itself, where nothing can be written, or over anything but an earlier output of
    the same command (`marker`)."""
    check_not_inside(output_dir, model_path, "--output_dir", "--model_path")
    check_writable_folder(output_dir, "--output_dir")
    check_writable_folder(output_dir.parent, "the folder of --output_dir")  # where the output is staged
    if not output_dir.exists() or not any(output_dir.iterdir()):
        return
    if not overwrite:
        raise UserError(f"{output_dir} exists and is not empty; choose another --output_dir or pass --overwrite")
    if not (output_dir / marker).is_file():
        raise UserError(
            f"--overwrite replaces only an earlier output of this command, and {output_dir} holds no {marker}"
        )


def merge(model_path: str, output_dir: str, dtype=None, device=None, base_model=None, overwrite=False) -> dict:
    from peft import PeftModel

    from sft.common.template import inference_chat_template

    run = read_run(model_path, base_model)
    if not run.is_adapter:
        raise UserError(f"{model_path} holds no LoRA adapter (adapter_config.json): nothing to merge")
    out = Path(output_dir)
    check_output_dir(out, run.model_path, overwrite)
    device = device or default_device()
    dtype = merge_dtype(run, device, dtype)
    trained_on = quantization_label(run, None)
    if trained_on != "none":
        logger.info(
            "the adapter was trained on a %s base; merging into quantized weights is lossy, so the base is "
            "reloaded unquantized in %s, merged and saved in that dtype",
            trained_on,
            str(dtype).removeprefix("torch."),
        )
    tokenizer = run.load_tokenizer()
    base = load_base(run, quantize=False, device=device, dtype=dtype)
    model = PeftModel.from_pretrained(base, run.model_path).eval()
    before = probe_logits(model, tokenizer)
    logger.info("merging the adapter into the base weights")
    merged = model.merge_and_unload()
    after = probe_logits(merged, tokenizer)
    max_diff = (after - before).abs().max().item()
    logger.info(
        "merged vs base + adapter, both unquantized %s: max |logit difference| on a probe %.3g",
        str(dtype).removeprefix("torch."),
        max_diff,
    )

    info = {
        "base_model": run.base_model,
        "adapter": str(run.model_path),
        "dtype": str(dtype).removeprefix("torch."),
        "adapter_trained_on": trained_on,
        "probe_max_abs_logit_diff": max_diff,
    }
    if trained_on != "none":
        info["note"] = f"merged into an unquantized {info['dtype']} copy of the base, not into the {trained_on} one"
    staging = out.with_name(f"{out.name}.partial")  # moved into place whole: a failed save leaves no merge behind
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with reporting_full_disk(out.parent, f"free some space and run the merge again; {out} was not touched"):
            merged.save_pretrained(staging)
            tokenizer.chat_template = inference_chat_template(tokenizer.chat_template)
            tokenizer.padding_side = "left"
            tokenizer.save_pretrained(staging)
            # the run's settings over the base's, so the merged model is evaluated and served as the run was
            save_generation_config(staging, load_generation_defaults(run.model_path), tokenizer)
            for name in COPIED_FILES:
                if (run.model_path / name).is_file():
                    shutil.copy2(run.model_path / name, staging / name)
            write_atomically(staging / MERGE_INFO, json.dumps(info, ensure_ascii=False, indent=2))
        if out.exists():
            shutil.rmtree(out)  # empty, or an earlier merge the user asked to replace (check_output_dir)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("merged model and tokenizer saved to %s", out)
    return info


@dataclass
class MergeArguments:
    """Which adapter to merge, into what, and where the merged model goes."""

    model_path: str = field(metadata={"help": "Training output folder holding the LoRA adapter."})
    output_dir: str | None = field(
        default=None, metadata={"help": "Where the merged model goes (default: <model_path>-merged)."}
    )
    dtype: str | None = field(
        default=None,
        metadata={
            "help": "Dtype of the merged weights (default: bf16 or fp16 on a GPU; on CPU or for a float32 base its "
            "own).",
            "choices": ["auto", "float32", "bfloat16", "float16"],
        },
    )
    base_model: str | None = field(
        default=None, metadata={"help": "Base model folder or Hub id (default: the adapter's own)."}
    )
    device: str | None = field(default=None, metadata={"help": "Where to merge: cuda, cpu (default: cuda if any)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an earlier merge in --output_dir."})
    checkpoint: str | None = field(default=None, metadata={"help": CHECKPOINT_HELP})

    def __post_init__(self):
        self.model_path = checkpoint_path(self.model_path, self.checkpoint)
        check_device(self.device)


@exits_cleanly_on_user_error
def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_arguments((MergeArguments,), sys.argv[1:] if argv is None else argv, prog="lccc-sft merge").values
    start_command_logging()
    output_dir = args.output_dir or f"{str(args.model_path).rstrip('/')}-merged"
    info = merge(args.model_path, output_dir, args.dtype, args.device, args.base_model, args.overwrite)
    print(f"merged model ({info['dtype']}) written to {output_dir}")
    return info


if __name__ == "__main__":
    main()
