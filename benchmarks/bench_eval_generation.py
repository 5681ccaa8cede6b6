"""Evaluation's reply generation: batches by prompt length (today) against batches in data order (before).

    python -m benchmarks.bench_eval_generation --model_path output/smoke [--num_samples 64] [--repeats 3]

On a trained run's held-out contexts, generates the same replies greedily twice per round with each path, for
the fine-tuned model and its base (adapter switched off), same batch size and max_new_tokens: (1) in data order,
as `make eval` did before, (2) `batch_generation.generate_replies`, sorted by prompt length. The fastest round
of each counts. Prints a Markdown table and saves benchmarks/results/eval_generation.json.
"""

import argparse
import json
import platform
import time

import torch

from benchmarks.common import RESULTS
from sft.common.generation import generation_kwargs, load_generation_defaults
from sft.common.inference import encode_prompt, load_model, read_run, render_prompt
from sft.evaluation.batch_generation import generate_replies
from sft.evaluation.held_out import held_out_conversations


@torch.no_grad()
def in_data_order(model, tokenizer, contexts, generation, batch_size) -> tuple[float, list[str]]:
    """The path before: batches in data order, each reply decoded from all the batch's new tokens."""
    kwargs = generation_kwargs(tokenizer, generation, sample=False)
    tokenizer.padding_side = "left"
    start, replies = time.perf_counter(), []
    for first in range(0, len(contexts), batch_size):
        prompts = [render_prompt(tokenizer, messages) for messages in contexts[first : first + batch_size]]
        batch = encode_prompt(tokenizer, prompts, padding=True, return_tensors="pt")
        output = model.generate(**batch, **kwargs)
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        replies += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return time.perf_counter() - start, replies


def by_length(model, tokenizer, contexts, generation, batch_size) -> tuple[float, list[str]]:
    generated = generate_replies(model, tokenizer, contexts, generation, batch_size, sample=False)
    return generated.seconds, [reply.text for reply in generated.replies]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", default="output/smoke")
    parser.add_argument("--num_samples", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    run = read_run(args.model_path)
    conversations, *_ = held_out_conversations(run, argparse.Namespace(dataset_name=None, split="test"))
    contexts = [messages[:-1] for messages in conversations[: args.num_samples]]
    generation = load_generation_defaults(run.model_path, {"max_new_tokens": args.max_new_tokens, "seed": run.seed})
    tokenizer = run.load_tokenizer()
    model = load_model(run, device="cpu")
    rows = []
    for label in ("fine-tuned", "base"):
        best = {}
        for _ in range(args.repeats):
            for name, path in (("data order (before)", in_data_order), ("by length (now)", by_length)):
                if label == "base":
                    with model.disable_adapter():
                        seconds, replies = path(model, tokenizer, contexts, generation, args.batch_size)
                else:
                    seconds, replies = path(model, tokenizer, contexts, generation, args.batch_size)
                best[name] = min(best.get(name, (float("inf"), None)), (seconds, replies), key=lambda r: r[0])
        (before, old), (now, new) = best["data order (before)"], best["by length (now)"]
        rows.append({"model": label, "before_s": before, "now_s": now, "speedup": before / now, "same": old == new})
    result = {"settings": vars(args), "machine": platform.processor() or platform.machine(), "rows": rows}
    out = RESULTS / "eval_generation.json"
    out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print("| model | data order (before), s | by length (now), s | speed-up | same greedy replies |")
    print("|---|---:|---:|---:|---|")
    for row in rows:
        print(
            f"| {row['model']} | {row['before_s']:.2f} | {row['now_s']:.2f} | {row['speedup']:.2f}x | {row['same']} |"
        )


if __name__ == "__main__":
    main()
