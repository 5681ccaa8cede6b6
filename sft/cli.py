"""`lccc-sft COMMAND [--config recipe.yaml] [--flag value ...]`: one command-line tool for every stage.

Each command takes the same dataclass arguments as before (`lccc-sft COMMAND --help` lists them); a recipe's keys
work as flags and flags win over the recipe. Several processes train with `accelerate launch sft/run.py ...`.
"""

import difflib
import importlib
import sys

from sft.common.errors import UserError, exits_cleanly_on_user_error

# name: (module whose `main(argv)` runs it, one line for `--help`)
COMMANDS = {
    "train": ("sft.run", "fine-tune with a recipe (one process; several: accelerate launch sft/run.py)"),
    "plan": ("sft.run", "what a run would decide, without loading or writing anything"),
    "data": ("sft.data.__main__", "prepare a recipe's data alone (stats.json)"),
    "pairs": ("sft.preference.mining", "mine preference pairs from an SFT run's failures (pairs_stats.json)"),
    "dpo": ("sft.preference.launch", "preference-tune a finished SFT run's adapter (DPO) with a recipe"),
    "eval": ("sft.evaluation.evaluate", "evaluate a trained run on its held-out split"),
    "select": ("sft.evaluation.select", "score every checkpoint of a run and keep the best within a forgetting budget"),
    "chat": ("sft.serving.chat", "chat with a trained run in the terminal"),
    "serve": ("sft.serving.server", "OpenAI-compatible API and a chat page on 127.0.0.1"),
    "merge": ("sft.export.merge", "merge the adapter into a standalone model"),
    "export-gguf": ("sft.export.gguf", "GGUF for llama.cpp, Ollama and LM Studio, with a Modelfile"),
    "audit": ("sft.audit.certify", "certify a recipe or a run: loss on replies only, template, stop tokens, export"),
    "tiny": ("sft.tiny", "build a tiny offline model of one family for smoke runs"),
}
# Words a command adds in front of the user's (`plan` is `train --dry_run true`).
PRESET_ARGUMENTS = {"plan": ["--dry_run", "true"]}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items()]
    return "usage: lccc-sft COMMAND [--config recipe.yaml] [--flag value ...]\n\ncommands:\n" + "\n".join(lines)


@exits_cleanly_on_user_error
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        if not argv:
            raise SystemExit(2)
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"; did you mean `{close[0]}`?" if close else f"; commands: {', '.join(COMMANDS)}"
        raise UserError(f"unknown command `{name}`{hint}")
    module = importlib.import_module(COMMANDS[name][0])
    module.main([*PRESET_ARGUMENTS.get(name, []), *rest])
