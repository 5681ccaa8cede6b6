"""Run by tests/test_distributed.py under torchrun: FSDP2 (torch's fully_shard) over a 4-bit LoRA model on CPU.

Every rank trains the same batch, so the averaged gradients equal one process's and the weights must match a
1-process run. Writes, from rank 0, the losses, the 4-bit weight's type before and after sharding, and the LoRA
weights, to the JSON file given as the second argument.
"""

import json
import sys

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, BitsAndBytesConfig


def main(model_path: str, output: str, steps: int = 5) -> None:
    dist.init_process_group("gloo")
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_quant_storage=torch.float32,  # what the launcher sets under FSDP: the compute dtype
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_path, quantization_config=quantization, dtype=torch.float32, device_map={"": "cpu"}
    )
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    layers = model.base_model.model.model.layers
    before = layers[0].self_attn.q_proj.base_layer.weight
    stored = {"class": type(before).__name__, "dtype": str(before.dtype)}
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    after = layers[0].self_attn.q_proj.base_layer.weight
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    batch = torch.randint(3, 500, (4, 64), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    lora = {name: p.full_tensor().flatten()[:64].tolist() for name, p in model.named_parameters() if p.requires_grad}
    if dist.get_rank() == 0:
        report = {"stored": stored, "sharded_class": type(after).__name__, "losses": losses, "lora": lora}
        report["world_size"] = dist.get_world_size()
        with open(output, "w", encoding="utf-8") as file:
            json.dump(report, file)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
