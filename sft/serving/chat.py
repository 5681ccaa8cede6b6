"""Chat with a trained model in the terminal: replies stream token by token and the conversation is remembered.

lccc-sft chat --model_path output/smoke                      # interactive; /reset clears, /exit quits
lccc-sft chat --model_path output/smoke --message "你好"      # one reply, for scripts (repeatable)

The history is kept in the chat format the model was trained on; when the prompt plus the reply would no longer
fit the context window, the oldest turns are dropped first.
"""

import logging
import sys
from dataclasses import dataclass, field

import torch
from transformers import TextStreamer

from sft.common.errors import UserError, exits_cleanly_on_user_error
from sft.common.generation import GenerationArguments, generation_kwargs
from sft.common.inference import (
    default_device,
    encode_prompt,
    load_model,
    parse_generating_command,
    read_run,
    render_prompt,
    start_command_logging,
)

logger = logging.getLogger(__name__)
USER_PROMPT = "user> "
ASSISTANT_PROMPT = "assistant> "
RESET, EXIT = "/reset", "/exit"


class MessageTooLong(Exception):
    """The new message alone does not fit the context window."""


class ChatSession:
    """A multi-turn conversation with a model: history, trimming from the oldest turn, streamed replies."""

    def __init__(self, model, tokenizer, *, system_prompt=None, max_context=4096, generation=None):
        self.model = model
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt or None
        self.generation = generation or generation_kwargs(tokenizer, GenerationArguments())
        self.max_context = max_context
        self.history: list[dict] = []
        self.dropped_turns = 0

    def reset(self) -> None:
        self.history = []

    def messages(self, history: list[dict]) -> list[dict]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + history

    def prompt_ids(self, user_text: str) -> list[int]:
        """The prompt for the next reply, dropping the oldest turns until prompt and reply fit the context."""
        budget = self.max_context - self.generation["max_new_tokens"]
        history = self.history
        while True:
            turns = history + [{"role": "user", "content": user_text}]
            ids = encode_prompt(self.tokenizer, render_prompt(self.tokenizer, self.messages(turns)))["input_ids"]
            if len(ids) <= budget:
                break
            if not history:
                raise MessageTooLong(
                    f"the message takes {len(ids)} tokens with the chat format; at most {budget} fit "
                    f"(context {self.max_context} minus {self.generation['max_new_tokens']} new tokens)"
                )
            history = history[2:]  # the oldest user message and its reply
        if len(history) < len(self.history):
            dropped = (len(self.history) - len(history)) // 2
            self.dropped_turns += dropped
            logger.info("context full: dropped the %d oldest turn(s), %d kept", dropped, len(history) // 2)
            self.history = history
        return ids

    def reply(self, user_text: str, prefix: str = "") -> str:
        """Generate the reply to `user_text` (streamed to stdout after `prefix`), remembering both."""
        ids = self.prompt_ids(user_text)
        input_ids = torch.tensor([ids], device=self.model.device)
        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        print(prefix, end="", flush=True)
        with torch.no_grad():
            output = self.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer, **self.generation
            )
        text = self.tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True).strip()
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": text}]
        return text


def interactive(session: ChatSession, lines=None) -> None:
    """Read messages from stdin until /exit, end of input or Ctrl-C; /reset forgets the conversation.

    Input that is not typed at a terminal (a pipe, a file) is echoed after the prompt so the transcript reads
    like a conversation.
    """
    lines = lines if lines is not None else sys.stdin
    echo = not lines.isatty()
    print(f"Chat with the model: {RESET} clears the history, {EXIT} (or Ctrl-D) quits.", flush=True)
    try:
        while True:
            print(USER_PROMPT, end="", flush=True)
            line = lines.readline()
            if not line:  # end of input
                print()
                return
            text = line.strip()
            if echo:
                print(text, flush=True)
            if text == EXIT:
                return
            if text == RESET:
                session.reset()
                print("(history cleared)", flush=True)
            elif text:
                try:
                    session.reply(text, prefix=ASSISTANT_PROMPT)
                except MessageTooLong as err:
                    print(f"(not sent: {err})", flush=True)
    except KeyboardInterrupt:
        print()


@dataclass
class ChatArguments:
    """What to say, and the conversation's frame."""

    message: list[str] | None = field(
        default=None,
        metadata={"help": "Reply to this message and exit (repeat the flag for several turns).", "action": "extend"},
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "System prompt (default: the recipe's; '' for none)."}
    )
    max_context: int | None = field(default=None, metadata={"help": "Context window in tokens (default: the model's)."})


def context_window(model) -> int:
    config = model.config
    return int(getattr(config, "max_position_embeddings", None) or 4096)


@exits_cleanly_on_user_error
def main(argv: list[str] | None = None) -> list[str]:
    where, args, settings = parse_generating_command(
        ChatArguments, sys.argv[1:] if argv is None else argv, prog="lccc-sft chat"
    )
    if args.message is not None and not all(m.strip() for m in args.message):
        raise UserError("--message must not be empty")
    start_command_logging()
    from transformers import set_seed

    run = read_run(where.model_path, where.base_model)
    tokenizer = run.load_tokenizer()
    model = load_model(run, quantize=where.quantize, device=where.device or default_device())
    max_context = args.max_context or context_window(model)
    if max_context <= settings.max_new_tokens:
        raise UserError(
            f"--max_context ({max_context}) must be larger than --max_new_tokens ({settings.max_new_tokens})"
        )
    system_prompt = run.recipe.get("system_prompt") if args.system_prompt is None else args.system_prompt
    session = ChatSession(
        model,
        tokenizer,
        system_prompt=system_prompt,
        max_context=max_context,
        generation=generation_kwargs(tokenizer, settings),
    )
    set_seed(run.seed if settings.seed is None else settings.seed)
    if args.message is None:
        interactive(session)
        return [m["content"] for m in session.history if m["role"] == "assistant"]
    replies = []
    for message in args.message:
        try:
            replies.append(session.reply(message.strip()))
        except MessageTooLong as err:
            raise UserError(str(err)) from None
    return replies


if __name__ == "__main__":
    main()
