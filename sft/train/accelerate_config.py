"""`python -m sft.train.accelerate_config FILE`: check an `accelerate launch --config_file` before the launch.

accelerate reads the file in the launcher and answers a missing, malformed or unknown-keyed one with a traceback;
`make sft` / `make plan` run this first, so such a file is one `error:` line (exit code 2). The file is read with
accelerate's own loader, so what passes here is what the launch reads.
"""

import sys

import yaml

from sft.common.errors import UserError, exits_cleanly_on_user_error


def check_accelerate_config(path: str) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    try:
        load_config_from_file(path)
    except FileNotFoundError:
        raise UserError(f"accelerate config {path} not found (see accelerate_configs/ for the shipped ones)") from None
    except yaml.YAMLError as err:
        raise UserError(f"accelerate config {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise UserError(f"accelerate config {path} is not UTF-8 text") from None
    except AttributeError:
        raise UserError(f"accelerate config {path} must be a mapping of `key: value` lines") from None
    except (ValueError, TypeError, KeyError, OSError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"accelerate config {path} cannot be used: {message}") from None


@exits_cleanly_on_user_error
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise UserError("usage: python -m sft.train.accelerate_config ACCELERATE_CONFIG_FILE")
    check_accelerate_config(argv[0])


if __name__ == "__main__":
    main()
