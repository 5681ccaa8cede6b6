"""`--backend vllm`: evaluation replies from vLLM on a GPU, the adapter applied through vLLM's LoRA support.

vLLM loads the base unquantized (bf16/fp16 as the recipe's dtype says), so compare its greedy replies with
`--no_quantize` replies of the default backend. Perplexity is still measured by transformers.
"""

import json
import time

from sft.common.errors import UserError
from sft.common.generation import GenerationArguments
from sft.common.inference import encode_prompt, render_prompt
from sft.evaluation.batch_generation import Generated, Reply

GPU_MEMORY_SHARE = 0.5  # the transformers model (for perplexity) shares the GPU with vLLM's cache


class VllmReplies:
    """One vLLM engine for a run: the base with the run's adapter as a LoRA request, or a merged model as saved."""

    def __init__(self, run, seed: int):
        try:
            from vllm import LLM
        except ImportError:
            raise UserError("--backend vllm needs vLLM on a CUDA machine: pip install vllm") from None
        self.adapter = None
        lora = {}
        if run.is_adapter:
            from vllm.lora.request import LoRARequest

            rank = json.loads((run.model_path / "adapter_config.json").read_text(encoding="utf-8"))["r"]
            lora = {"enable_lora": True, "max_lora_rank": rank, "max_loras": 1}
            self.adapter = LoRARequest("adapter", 1, str(run.model_path))
        dtype = str(run.model_args.dtype or "auto").removeprefix("torch.")
        self.llm = LLM(
            model=run.base_model if run.is_adapter else str(run.model_path),
            tokenizer=str(run.model_path),
            dtype=dtype,
            seed=seed,
            trust_remote_code=run.trust_remote_code,
            gpu_memory_utilization=GPU_MEMORY_SHARE,
            **lora,
        )

    def generate(
        self, tokenizer, contexts: list[list[dict]], generation: GenerationArguments, sample: bool, adapter: bool
    ) -> Generated:
        """Replies for each context, with the adapter or from the base alone."""
        from vllm import SamplingParams

        if generation.no_repeat_ngram_size:
            raise UserError("--backend vllm has no no_repeat_ngram_size; set it to 0 or use the default backend")
        params = SamplingParams(
            max_tokens=generation.max_new_tokens,
            temperature=generation.temperature if sample else 0.0,
            top_p=generation.top_p if sample else 1.0,
            top_k=generation.top_k if sample and generation.top_k else -1,
            repetition_penalty=generation.repetition_penalty,
            seed=generation.seed,
            stop_token_ids=[tokenizer.eos_token_id],
        )
        prompts = [
            {"prompt_token_ids": encode_prompt(tokenizer, render_prompt(tokenizer, messages))["input_ids"]}
            for messages in contexts
        ]
        start = time.perf_counter()
        outputs = self.llm.generate(prompts, params, lora_request=self.adapter if adapter else None, use_tqdm=False)
        seconds = time.perf_counter() - start
        replies = []
        for output in outputs:
            completion = output.outputs[0]
            stopped = completion.finish_reason == "stop"
            replies.append(Reply(text=completion.text.strip(), tokens=len(completion.token_ids), stopped=stopped))
        return Generated(replies=replies, seconds=seconds)
