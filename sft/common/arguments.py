"""One way from a recipe file and `--flag value` words to checked dataclass arguments, for every entry point.

Every command (train, data, eval, chat, merge, serve, export) declares its arguments as dataclasses and parses them
here, through TRL's parser: values from `--config recipe.yaml` become the defaults, `--flag` overrides on the
command line win, and every mistake (an unknown key or flag, a value of the wrong type, a missing recipe) is a
`UserError`: one line and exit code 2, never a usage page or a traceback.
"""

import argparse
import difflib
import enum
import math
import os
from dataclasses import dataclass
from pathlib import Path

import yaml
from trl import TrlParser

from sft.common.errors import UserError

# Arguments renamed upstream, the newer name -> the older one: transformers < 5.23 knows activation checkpointing only
# as `gradient_checkpointing` (5.23 made that an alias), so a recipe with the newer name still runs there.
OLDER_NAMES = {
    "activation_checkpointing": "gradient_checkpointing",
    "activation_checkpointing_kwargs": "gradient_checkpointing_kwargs",
}

# Float arguments for which infinity means something (`max_grad_norm: .inf`: measure the norm, never clip); every
# other float must be finite, and NaN never passes.
INFINITY_ALLOWED = {"max_grad_norm"}


def finite_float(text: str) -> float:
    """A float argument that infinity or NaN would silently break (a learning rate of inf trains NaN weights)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


def float_or_infinity(text: str) -> float:
    value = float(text)
    if math.isnan(value):
        raise argparse.ArgumentTypeError(f"expected a number, got {text}")
    return value


# argparse and the recipe checks name an expected type by its __name__: these still read "float"
finite_float.__name__ = float_or_infinity.__name__ = "float"


class ArgumentParser(TrlParser):
    """TRL's parser, reporting a bad command-line word as a UserError instead of a page of usage, and refusing
    non-finite floats where they make no sense."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for action in self._actions:
            if action.type is float:
                action.type = float_or_infinity if action.dest in INFINITY_ALLOWED else finite_float

    def error(self, message):
        raise UserError(message)


@dataclass
class Parsed:
    """The parsed dataclasses in the order asked for, and the keys the user chose (recipe keys, then flags)."""

    values: tuple
    chosen: list[str]


def read_recipe_file(path: str) -> dict:
    """Load a recipe YAML safely, with one clear message for a missing file, a syntax error or an empty file."""
    recipe_path = Path(path)
    if not recipe_path.exists():
        raise UserError(f"recipe file not found: {path}")
    if not recipe_path.is_file():
        raise UserError(f"recipe {path} is not a regular file (a folder, a pipe or a device): give a YAML file")
    try:
        recipe = yaml.safe_load(recipe_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise UserError(f"recipe {path} is not UTF-8 text (byte {err.start}): give a YAML file") from None
    except OSError as err:
        raise UserError(f"cannot read recipe {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"recipe {path} is not valid YAML{where}: {problem}") from None
    if recipe is None:
        raise UserError(f"recipe {path} is empty: give at least `model_name_or_path` and `dataset_name`")
    if not isinstance(recipe, dict):
        raise UserError(f"recipe {path} must be a mapping of `key: value` lines")
    return recipe


def take_recipe(argv: list[str]) -> tuple[dict, list[str]]:
    """Split `--config recipe.yaml` off the command line: the recipe (its `env:` applied) and the other words."""
    args, recipe = [], {}
    for arg in argv:  # `--config=path` is `--config path`
        args += arg.split("=", 1) if arg.startswith("--config=") else [arg]
    if args.count("--config") > 1:
        raise UserError("--config is given twice: give one recipe, and override its keys with --flags")
    if "--config" in args:
        at = args.index("--config")
        if at + 1 >= len(args):
            raise UserError("--config needs a recipe path, e.g. --config recipes/smoke.yaml")
        recipe = read_recipe_file(args[at + 1])
        del args[at : at + 2]
    env = recipe.pop("env", None) or {}
    if not isinstance(env, dict):
        raise UserError("recipe key `env` must be a mapping of variables, e.g. `env: {WANDB_PROJECT: lccc}`")
    for name, value in env.items():
        os.environ[str(name)] = str(value)
    return recipe, args


def did_you_mean(key: str, known) -> str:
    match = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean `{match[0]}`?)" if match else ""


def plain(value):
    """A YAML-friendly copy of an argument value."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def _coerce(action, key: str, value):
    """Convert a YAML value with the argparse type of its field, or explain what was expected."""
    if value is None:
        return None
    if action.nargs in ("+", "*"):
        return [_coerce_one(action, key, v) for v in (value if isinstance(value, list) else [value])]
    return _coerce_one(action, key, value)


def _coerce_one(action, key: str, value):
    if isinstance(value, (dict, list)) or action.type is None:
        return value
    expected = getattr(action.type, "__name__", "a valid value")
    if isinstance(value, bool) and action.type in (int, float):
        raise UserError(f"recipe key `{key}`: expected {expected}, got {value!r}")
    try:
        converted = action.type(str(value) if not isinstance(value, str) else value)
    except argparse.ArgumentTypeError as err:
        raise UserError(f"recipe key `{key}`: {err}") from None
    except (TypeError, ValueError, KeyError):
        raise UserError(f"recipe key `{key}`: expected {expected}, got {value!r}") from None
    if action.choices is not None and converted not in action.choices:
        choices = ", ".join(str(plain(c)) for c in action.choices)
        raise UserError(f"recipe key `{key}`: {value!r} is not one of {choices}")
    return converted


def to_known_names(recipe: dict, cli_args: list[str], known) -> tuple[dict, list[str]]:
    """The recipe and command line with each newer argument name the parser lacks spelled the older way it knows."""
    renamed = {new: old for new, old in OLDER_NAMES.items() if new not in known and old in known}
    recipe = {renamed.get(key, key): value for key, value in recipe.items()}
    words = []
    for word in cli_args:
        name, equals, value = word[2:].partition("=")
        older = renamed.get(name.replace("-", "_")) if word.startswith("--") else None
        words.append(f"--{older}{equals}{value}" if older else word)
    return recipe, words


def flag_names(cli_args: list[str]) -> list[str]:
    """The option names on a command line, `-` spelled `_` as in the dataclass fields."""
    return [arg[2:].split("=", 1)[0].replace("-", "_") for arg in cli_args if arg.startswith("--")]


def check_each_flag_once(flags: list[str], options: dict, repeatable: set[str]) -> None:
    """Refuse an option given twice (`--lr 1 ... --lr 2`, or `--x` with `--no_x`): which one was meant is a guess.
    Options that collect their values (`--message a --message b`) are meant to be repeated."""
    seen = {}
    for flag in flags:
        if options[flag] in seen and options[flag] not in repeatable:
            also = f" (also as --{seen[options[flag]]})" if seen[options[flag]] != flag else ""
            raise UserError(f"--{flag} is given twice{also}: give each option once")
        seen[options[flag]] = flag


def check_seeds(parsed: list) -> None:
    """Every seed argument (`seed`, `data_seed`, ...) of every command is zero or more, as the RNGs need."""
    for values in parsed:
        for name, value in vars(values).items():
            if (name == "seed" or name.endswith("_seed")) and isinstance(value, int) and value < 0:
                raise UserError(f"`{name}` must be zero or more, got {value}")


def invalid_value_message(err: ValueError) -> str:
    message = str(err).splitlines()[0]
    if "support bf16" in message:
        return (
            "bf16 is on (TRL's default) but this machine has no bf16 support: set `bf16: false` in the recipe "
            "or pass `--bf16 false`, and `--fp16 true` on a GPU without bf16; to plan for a GPU from this machine, "
            "`lccc-sft plan --gpu NAME` (`make plan GPU=NAME`: T4, L4, A10, 4090, A100, H100, H200)"
        )
    return message


def parse_arguments(
    dataclass_types: tuple,
    argv: list[str] = (),
    *,
    recipe: dict | None = None,
    defaults: dict | None = None,
    ignore_unknown_keys: bool = False,
    prog: str | None = None,
) -> Parsed:
    """Parse `--config recipe.yaml` (or a `recipe` already read) plus `--flag value` words into the dataclasses.

    `defaults` are the program's own defaults for keys the recipe leaves out; `ignore_unknown_keys` reads only the
    keys these dataclasses know from a recipe written for a larger set (a run's recipe.yaml read by eval).
    """
    parser = ArgumentParser(dataclass_types, prog=prog, allow_abbrev=False)
    from_file, args = take_recipe(list(argv))
    recipe = {**(recipe or {}), **from_file}
    actions = {action.dest: action for action in parser._actions if action.dest != "help"}
    recipe, args = to_known_names(recipe, args, actions)
    # every spelling of an option (`--no_x` too) -> the field it sets
    options = {name[2:].replace("-", "_"): action.dest for action in parser._actions for name in action.option_strings}
    values = {}
    for key, value in recipe.items():
        if key in actions:
            values[key] = _coerce(actions[key], key, value)
        elif not ignore_unknown_keys:
            raise UserError(f"unknown recipe key `{key}`{did_you_mean(key, actions)}")
    parser.set_defaults_with_config(**{**(defaults or {}), **values})

    flags = flag_names(args)
    for flag in flags:
        if flag not in options:
            raise UserError(f"unknown option `--{flag}`{did_you_mean(flag, options)}")
    collecting = (argparse._AppendAction, argparse._ExtendAction)
    check_each_flag_once(flags, options, {a.dest for a in parser._actions if isinstance(a, collecting)})
    try:
        *parsed, unused = parser.parse_args_into_dataclasses(args=args, return_remaining_strings=True)
    except ValueError as err:
        raise UserError(f"invalid value: {invalid_value_message(err)}") from None
    if unused:
        raise UserError(f"could not use these command-line words: {' '.join(unused)}")
    check_seeds(parsed)
    chosen = list(dict.fromkeys([*(key for key in recipe if key in actions), *(options[flag] for flag in flags)]))
    return Parsed(values=tuple(parsed), chosen=chosen)
