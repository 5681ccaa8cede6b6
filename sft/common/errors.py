"""For entry points: user errors end with one clear message and a non-zero exit, and one log format."""

import functools
import sys

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class UserError(Exception):
    """A mistake the user can fix (recipe, paths, data); printed without a traceback."""


def exits_cleanly_on_user_error(main):
    """Wrap an entry point so a UserError ends the process with its message and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
