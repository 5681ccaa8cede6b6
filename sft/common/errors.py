"""For entry points: user errors end with one clear message and a non-zero exit, and one log format."""

import functools
import os
import sys

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
INTERRUPTED_EXIT = 130  # the shell's code for a process ended by Ctrl-C (128 + SIGINT)


class UserError(Exception):
    """A mistake the user can fix (recipe, paths, data); printed without a traceback."""


def say_error(message: str) -> None:
    """One `error:` line on stderr, from the first process of a launch only (the others share the mistake)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr)


def exits_cleanly_on_user_error(main):
    """Wrap an entry point: a UserError ends the process with its message and exit code 2, Ctrl-C with one line
    and exit code 130 (what was being written is left to each writer's own clean-up: temporary names, staging)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            say_error(str(err))
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            say_error("interrupted (Ctrl-C); nothing was finished or published")
            raise SystemExit(INTERRUPTED_EXIT) from None

    return wrapper
