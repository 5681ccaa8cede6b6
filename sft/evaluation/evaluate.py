"""Evaluate a trained adapter on the held-out LCCC test split, optionally side by side with its base model.

lccc-sft eval --model_path output/smoke [--compare_base] [--num_samples 100] [--knowledge cmmlu]
lccc-sft eval --model_path output/smoke-dpo --compare_base --compare_runs output/smoke   (base vs SFT vs DPO)
python sft/evaluate.py --model_path ./output/llama2-7b-chat-lccc

Measures perplexity over the assistant reply tokens only (the training loss masking), generates replies for test
contexts greedily and with the run's sampling settings (its `generation_config.json`; by default the LCCC paper's
nucleus sampling, p=0.9, temperature 0.7, seeded), scores them with the paper's automatic metrics (character-level
BLEU-2/BLEU-4, Distinct-1/2, average length), with how often replies never stop or loop and with the Chinese chat
diagnostics (generic replies, drift, echoes, self-repetition), times the generation, evaluates other runs
(`--compare_runs`) the same way,
optionally checks multiple-choice knowledge through lm-eval, and writes `eval_report.json`, `eval_report.md` and
`loss_curves.png`.
"""

import dataclasses
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sft.common.errors import UserError, exits_cleanly_on_user_error
from sft.common.files import check_writable_folder, write_atomically
from sft.common.generation import (
    GenerationArguments,
    save_generation_config,
)
from sft.common.inference import (
    TrainedModelArguments,
    default_device,
    load_base,
    load_model,
    parse_generating_command,
    quantization_label,
    read_run,
    start_command_logging,
)
from sft.evaluation.batch_generation import generate_replies
from sft.evaluation.diagnostics import DiagnosticInputs, diagnose, diagnostic_inputs
from sft.evaluation.held_out import held_out_conversations, reply_perplexity
from sft.evaluation.metrics import score_replies
from sft.evaluation.report import DECODINGS, markdown_report, metrics_table, plot_loss_curves

logger = logging.getLogger(__name__)

HEADLINE_DECODING = "sampling"  # the LCCC paper scores replies decoded with nucleus sampling
BACKENDS = ["transformers", "vllm"]
WORST_REPLIES = 20  # at most this many looping or unstopped replies kept in the report


def evaluate_model(
    model,
    tokenizer,
    conversations,
    contexts,
    references,
    settings: dict,
    generation: GenerationArguments,
    label: str,
    diagnostic_inputs: DiagnosticInputs,
    engine=None,
) -> dict:
    """Perplexity, then replies decoded both ways with their metrics, speed and per-reply loop values, and the
    diagnostics of the headline decoding's replies with their worst examples.

    `engine` (a `VllmReplies`) generates instead of `model`: with the adapter for the fine-tuned label only.
    """
    logger.info("%s: perplexity over the replies of %d test conversations", label, len(conversations))
    perplexity = reply_perplexity(
        model, tokenizer, conversations, settings["max_length"], settings["batch_size"], settings["last_reply_only"]
    )

    def generate(contexts: list[list[dict]], sample: bool = True):
        if engine:
            return engine.generate(tokenizer, contexts, generation, sample, adapter=label == "fine-tuned")
        return generate_replies(model, tokenizer, contexts, generation, settings["batch_size"], sample)

    replies, scores, worst = {}, {}, []
    for decoding in DECODINGS:
        logger.info("%s: generating %d replies (%s)", label, len(contexts), decoding)
        sample = decoding == "sampling"
        generated = generate(contexts, sample)
        texts = [reply.text for reply in generated.replies]
        stopped = [reply.stopped for reply in generated.replies]
        metrics, per_reply = score_replies(texts, references, stopped)
        scores[decoding] = {**metrics, **generated.speed}
        replies[decoding] = texts
        for context, reply, loops, rate in zip(
            contexts, generated.replies, per_reply["loops"], per_reply["repeated_ngram_rates"], strict=True
        ):
            if loops or not reply.stopped:
                worst.append(
                    {"model": label, "decoding": decoding, "context": context, "reply": reply.text, "loops": loops}
                    | {"stopped": reply.stopped, "tokens": reply.tokens, "repeated_ngram_rate": rate}
                )
    logger.info("%s: diagnostics of the %s replies", label, HEADLINE_DECODING)
    diagnostics, examples = diagnose(
        lambda more: [reply.text for reply in generate(more).replies],
        contexts,
        replies[HEADLINE_DECODING],
        diagnostic_inputs,
    )
    metrics = {
        "perplexity": perplexity.pop("perplexity"),
        **scores[HEADLINE_DECODING],
        **diagnostics,
        **perplexity,
        **scores,
    }
    return {"metrics": metrics, "replies": replies, "worst": worst, "diagnostic_examples": examples}


def most_repetitive(worst: list[dict]) -> list[dict]:
    """The looping or unstopped replies, most repetitive first, then those that never stopped."""
    ranked = sorted(worst, key=lambda entry: (-entry["repeated_ngram_rate"], entry["stopped"]))
    return ranked[:WORST_REPLIES]


# --- The command. -----------------------------------------------------------------------------------------------


@dataclass
class EvalArguments:
    """What to evaluate on, how much of it, and where the report goes."""

    output_dir: str | None = field(
        default=None, metadata={"help": "Where the report goes (default: the model folder)."}
    )
    compare_base: bool = field(default=False, metadata={"help": "Also evaluate the base model, side by side."})
    compare_runs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Also evaluate these trained runs (e.g. the SFT run a DPO run continued) on the same contexts "
            "with the same settings, side by side.",
            "nargs": "+",
        },
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "Evaluate on this LCCC file or Hub id instead of the recipe's data."}
    )
    split: str = field(default="test", metadata={"help": "Held-out split to evaluate on."})
    num_samples: int = field(default=100, metadata={"help": "Test contexts to generate replies for."})
    max_ppl_samples: int | None = field(
        default=None, metadata={"help": "At most this many conversations for perplexity."}
    )
    batch_size: int = field(default=8, metadata={"help": "Conversations per forward pass or generate call."})
    num_examples: int = field(default=5, metadata={"help": "Example (and worst) replies shown in eval_report.md."})
    generic_top_k: int = field(
        default=20, metadata={"help": "The training data's this many most frequent replies count as generic."}
    )
    num_dialogues: int = field(
        default=20, metadata={"help": "Multi-turn test dialogues answered turn by turn (cross-turn self-repetition)."}
    )
    knowledge: list[str] | None = field(
        default=None,
        metadata={"help": "lm-eval tasks to score base and fine-tuned on (cmmlu, ceval-valid, ...).", "nargs": "+"},
    )
    knowledge_tasks_dir: str | None = field(
        default=None, metadata={"help": "A folder of lm-eval task YAMLs to take the --knowledge tasks from."}
    )
    knowledge_limit: int | None = field(default=None, metadata={"help": "At most this many questions per task."})
    backend: str = field(
        default="transformers",
        metadata={"help": "What generates the replies: transformers, or vllm on a CUDA GPU.", "choices": BACKENDS},
    )
    save_generation_config: bool = field(
        default=False,
        metadata={"help": "Save the generation settings evaluated with as the run's generation_config.json."},
    )

    def __post_init__(self):
        if min(self.num_samples, self.num_examples, self.num_dialogues, self.generic_top_k) < 0:
            raise UserError("--num_samples, --num_examples, --num_dialogues and --generic_top_k must be at least 0")
        if self.batch_size < 1:
            raise UserError("--batch_size must be positive")
        for name in ("max_ppl_samples", "knowledge_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1 (leave it out for all), got {getattr(self, name)}")


def parse_args(argv: list[str]) -> tuple[TrainedModelArguments, EvalArguments, GenerationArguments]:
    """The arguments; generation settings not given start from the run's saved `generation_config.json`."""
    return parse_generating_command(EvalArguments, argv, prog="lccc-sft eval")


def evaluate(where: TrainedModelArguments, args: EvalArguments, generation: GenerationArguments) -> dict:
    run = read_run(where.model_path, where.base_model)
    output_dir = Path(args.output_dir or run.model_path)
    check_writable_folder(output_dir, "--output_dir" if args.output_dir else "the report's folder (the model folder)")
    if args.save_generation_config:
        check_writable_folder(run.model_path, "the model folder (--save_generation_config)")
    if (args.compare_base or args.knowledge) and not run.base_model:
        raise UserError(f"{where.model_path} does not say which base it came from; give --base_model")
    conversations, last_reply_only, dataset_name, by_source = held_out_conversations(run, args)
    ppl_conversations = conversations[: args.max_ppl_samples]
    generated = conversations[: args.num_samples]
    contexts = [messages[:-1] for messages in generated]
    references = [messages[-1]["content"] for messages in generated]
    device = where.device or default_device()
    quantize = where.quantize
    generation = dataclasses.replace(generation, seed=run.seed if generation.seed is None else generation.seed)
    settings = {
        "split": args.split,
        "dataset_name": dataset_name,
        "ppl_conversations": len(ppl_conversations),
        "num_samples": len(contexts),
        **{key: value for key, value in dataclasses.asdict(generation).items() if key != "do_sample"},
        "batch_size": args.batch_size,
        "max_length": run.max_length,
        "last_reply_only": last_reply_only,
        "quantization": quantization_label(run, quantize),
        "dtype": str(run.model_args.dtype) if run.is_adapter else "as saved",
        "device": device,
        "headline_decoding": HEADLINE_DECODING,
        "backend": args.backend,
        "loop": "a character 4-gram occurring 3 or more times in a reply (whitespace left out, overlaps counted)",
        "never_stopped": "the reply ran into max_new_tokens without the end-of-turn token",
    }
    inputs = diagnostic_inputs(run, conversations, args.num_dialogues, args.generic_top_k, args.num_examples)
    if args.knowledge:
        from sft.evaluation.knowledge import accuracy, compare, task_manager

        manager = task_manager(args.knowledge, args.knowledge_tasks_dir)

    engine = None
    if args.backend == "vllm":
        if not run.is_adapter and (args.compare_base or args.knowledge):
            raise UserError("--backend vllm compares with the base for adapters only; evaluate the adapter folder")
        from sft.evaluation.vllm_generation import VllmReplies

        if args.compare_runs:
            raise UserError("--compare_runs generates with transformers; leave out --backend vllm")
        engine = VllmReplies(run, generation.seed)

    def evaluated(model, label: str, tokenizer) -> tuple[dict, dict | None]:
        result = evaluate_model(
            model, tokenizer, ppl_conversations, contexts, references, settings, generation, label, inputs, engine
        )
        if not args.knowledge:
            return result, None
        logger.info("%s: knowledge check on %s", label, ", ".join(args.knowledge))
        return result, accuracy(model, tokenizer, args.knowledge, manager, args.knowledge_limit, args.batch_size)

    tokenizer = run.load_tokenizer(reply_mask=True)
    model = load_model(run, quantize=quantize, device=device)
    tuned, tuned_knowledge = evaluated(model, "fine-tuned", tokenizer)
    if by_source:  # a mixture: each source's replies on their own
        tuned["metrics"]["perplexity_by_source"] = {
            label: reply_perplexity(
                model, tokenizer, source[: args.max_ppl_samples], run.max_length, args.batch_size, last_reply_only
            )["perplexity"]
            for label, source in by_source.items()
        }
    base = base_knowledge = None
    if args.compare_base or args.knowledge:
        if run.is_adapter:
            with model.disable_adapter():
                base, base_knowledge = evaluated(model, "base", tokenizer)
        else:  # a merged model: load the base it came from, unquantized like the merged weights
            model = None
            base, base_knowledge = evaluated(load_base(run, quantize=False, device=device).eval(), "base", tokenizer)
    model = None  # one model in memory at a time
    compared = {}
    for path in args.compare_runs or []:
        other = read_run(path)
        compared[path] = evaluate_model(
            load_model(other, quantize=quantize, device=device),
            other.load_tokenizer(reply_mask=True),
            *(ppl_conversations, contexts, references, settings, generation, path, inputs),
        )

    samples = []
    for i, (context, reference) in enumerate(zip(contexts, references, strict=True)):
        sample = {"context": context, "reference": reference}
        sample.update(greedy=tuned["replies"]["greedy"][i], sampled=tuned["replies"]["sampling"][i])
        if base:
            sample.update(base_greedy=base["replies"]["greedy"][i], base_sampled=base["replies"]["sampling"][i])
        if compared:
            sample["runs"] = {path: result["replies"]["greedy"][i] for path, result in compared.items()}
        samples.append(sample)

    output_dir.mkdir(parents=True, exist_ok=True)
    curves = plot_loss_curves(run.model_path / "trainer_state.json", output_dir / "loss_curves.png")
    report = {
        "model_path": str(run.model_path),
        "base_model": run.base_model,
        **tuned["metrics"],
        "base": base["metrics"] if base else None,
        "runs": {path: result["metrics"] for path, result in compared.items()} or None,
        "knowledge": None,
        "settings": settings,
        "loss_curves": str(curves) if curves else None,
        "worst": most_repetitive(
            tuned["worst"] + (base["worst"] if base else []) + [w for r in compared.values() for w in r["worst"]]
        ),
        "diagnostics": {
            "generic_replies": inputs.generic,
            "dialogues": len(inputs.dialogues),
            "system_prompt": inputs.system_prompt,
            "examples": {"fine-tuned": tuned["diagnostic_examples"]}
            | ({"base": base["diagnostic_examples"]} if base else {}),
        },
        "samples": samples,
    }
    if args.knowledge:
        report["knowledge"] = {
            "tasks": args.knowledge,
            "limit": args.knowledge_limit,
            "accuracy": compare(tuned_knowledge, base_knowledge),
        }
    for key in ("base", "runs", "knowledge"):
        if report[key] is None:
            del report[key]
    write_atomically(output_dir / "eval_report.json", json.dumps(report, ensure_ascii=False, indent=2))
    write_atomically(output_dir / "eval_report.md", markdown_report(report, args.num_examples))
    logger.info("wrote %s and %s", output_dir / "eval_report.json", output_dir / "eval_report.md")
    if args.save_generation_config:
        path = save_generation_config(run.model_path, generation, tokenizer)
        logger.info("saved the generation settings evaluated with to %s", path)
    return report


@exits_cleanly_on_user_error
def main(argv: list[str] | None = None) -> dict:
    where, args, generation = parse_args(sys.argv[1:] if argv is None else argv)
    start_command_logging()
    report = evaluate(where, args, generation)
    print(metrics_table(report))
    return report


if __name__ == "__main__":
    main()
