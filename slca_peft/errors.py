"""User errors end a command with one line on stderr, not a traceback.

`UserError` marks a problem the user can fix (bad argument, data, file). `run_main` runs a command's
`main` and turns any user error (also `ValueError`, `OSError`, YAML errors and `SystemExit` with a
message) into `slca-peft: error: <message>` and exit status 2. `--debug` on the command line or
`SLCA_PEFT_DEBUG=1` keeps the traceback. Other exceptions are bugs and keep their traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

DEBUG_ENV = "SLCA_PEFT_DEBUG"


class UserError(ValueError):
    """A problem with the user's input (arguments, data, files) that the message says how to fix."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ValueError, OSError]
    try:
        import yaml

        types.append(yaml.YAMLError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def one_line(err: BaseException) -> str:
    """The message on one line (safetensors/PIL messages may span several)."""
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, OSError) and err.filename and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    return text


def run_main(main: Callable[[list[str]], Any], argv: list[str] | None = None, prog: str = "slca-peft") -> Any:
    """Run `main(argv)`; report a user error as one line and exit 2 unless debugging."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    if "--debug" in argv:
        argv.remove("--debug")
        debug = True
    if debug:
        return main(argv)
    try:
        return main(argv)
    except SystemExit as err:
        if isinstance(err.code, str):
            print(f"{prog}: error: {' '.join(err.code.split())}", file=sys.stderr)
            raise SystemExit(2) from None
        raise
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except _user_error_types() as err:
        print(f"{prog}: error: {one_line(err)} (run with --debug for the traceback)", file=sys.stderr)
        raise SystemExit(2) from None
