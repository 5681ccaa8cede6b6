"""The held-out conversations a run is evaluated on, and perplexity over their replies."""

import dataclasses
import math

import torch

from sft.common.errors import UserError
from sft.common.inference import encode_prompt, render_prompt
from sft.common.template import reply_masked_tokens


@torch.no_grad()
def reply_perplexity(
    model, tokenizer, conversations: list[list[dict]], max_length: int, batch_size: int, last_reply_only=False
) -> dict:
    """exp(mean token cross-entropy) over the assistant reply tokens (and their `</s>`), as masked in training.

    With `last_reply_only` (prompt/completion samples) only the final reply counts, as in training.
    """
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(conversations), batch_size):
        encoded = [reply_masked_tokens(tokenizer, messages) for messages in conversations[start : start + batch_size]]
        ids = [e["input_ids"][:max_length] for e in encoded]
        masks = [e["assistant_masks"][:max_length] for e in encoded]
        if last_reply_only:
            prompts = conversations[start : start + batch_size]
            starts = [len(encode_prompt(tokenizer, render_prompt(tokenizer, m[:-1]))["input_ids"]) for m in prompts]
            masks = [[0] * min(begin, len(mask)) + mask[begin:] for begin, mask in zip(starts, masks, strict=True)]
        width = max(map(len, ids))
        input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        reply = torch.zeros_like(input_ids)
        for row, (tokens, mask) in enumerate(zip(ids, masks, strict=True)):
            input_ids[row, : len(tokens)] = torch.tensor(tokens)
            attention[row, : len(tokens)] = 1
            reply[row, : len(mask)] = torch.tensor(mask)
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits.float()
        targets = input_ids[:, 1:].to(device)
        counted = (reply[:, 1:] * attention[:, 1:]).bool().to(device)
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
        total_nll += nll[counted].sum().item()
        total_tokens += int(counted.sum())
    if not total_tokens:
        raise UserError("the test conversations hold no reply tokens to measure perplexity on")
    mean = total_nll / total_tokens
    return {"perplexity": math.exp(mean), "reply_loss": mean, "reply_tokens": total_tokens}


def row_messages(row: dict) -> tuple[list[dict], bool]:
    """A prepared sample as one message list, and whether only its last reply carried loss in training.

    Multi-turn samples (`messages`) train on every reply; prompt/completion samples only on the completion.
    """
    if row.get("messages"):
        return list(row["messages"]), False
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, list) and isinstance(completion, list) and completion:
        return [*prompt, *completion], True
    raise UserError(f"cannot evaluate samples with the fields {sorted(row)}: expected chat `messages`")


def held_out_conversations(run, args) -> tuple[list[list[dict]], bool, str, dict]:
    """The held-out split as the data step prepares it: message lists, last-reply-only flag, data name, and a
    mixture's message lists per source."""
    from sft.common.config import DataArguments
    from sft.common.inference import resolve_local
    from sft.data import held_out_by_source, load_conversations

    data = run.data
    if args.dataset_name:  # this data instead of the recipe's source or mixture
        data = dataclasses.replace(
            data or DataArguments(), dataset_name=resolve_local(args.dataset_name), datasets=None
        )
    if data is None:
        raise UserError(
            f"{run.model_path} has no recipe.yaml naming the training data; give the data with --dataset_name"
        )
    splits = load_conversations(data, run.seed)
    if args.split not in splits or not len(splits[args.split]):
        raise UserError(f"{data.dataset_name} has no `{args.split}` conversations to evaluate on")
    rows = [row_messages(row) for row in splits[args.split]]
    conversations = [messages for messages, _ in rows if messages and messages[-1]["role"] == "assistant"]
    if not conversations:
        raise UserError(f"the `{args.split}` split of {data.dataset_name} holds no replies to evaluate on")
    by_source = held_out_by_source(splits, args.split) or {}
    by_source = {label: [row_messages(row)[0] for row in ds] for label, ds in by_source.items() if len(ds)}
    return conversations, rows[0][1], data.dataset_name or "the mixture", by_source
