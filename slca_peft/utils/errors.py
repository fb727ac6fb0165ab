"""User errors end a command with one line on stderr, not a traceback; bugs keep theirs.

`UserError` marks a problem the user can fix (bad argument, data, file), with a message that says how;
library code raises it (`MissingFileError` for a path that does not exist) and wraps the errors of the
libraries it calls where the cause is the user's input. `run_main` prints a `UserError` (and argparse's
usage errors, and an optional dependency that is not installed, `OPTIONAL_DEPENDENCIES`) as
`slca-peft: error: <message>` and exits 2; every other exception is a bug and keeps its
traceback. `--debug` on the command line or `SLCA_PEFT_DEBUG=1` keeps the traceback of a user error too.
`no_exit` makes `sys.exit` inside user code (a callback) an error.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

DEBUG_ENV = "SLCA_PEFT_DEBUG"


class UserError(ValueError):
    """A problem with the user's input (arguments, data, files) that the message says how to fix: the
    command line prints it as one line. Any other exception is a bug of the library and keeps its
    traceback."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist (also a `FileNotFoundError`, as `open` raises)."""


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Refuse a setting that is not one of `choices`, naming them."""
    if value not in choices:
        raise UserError(f"{name}={value!r} is not one of {tuple(choices)}; pick one of them.")


def one_line(err: BaseException) -> str:
    """The message on one line (safetensors/PIL messages may span several)."""
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, OSError) and err.filename and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    if isinstance(err, UnicodeEncodeError) and isinstance(err.object, str) \
            and any("\udc80" <= c <= "\udcff" for c in err.object):
        # A file name that is not valid UTF-8 (os gives its bytes as surrogates): name it, escaped.
        text = f"the name {err.object!r} is not valid UTF-8 ({text}); rename the file or folder"
    return text




def _exit_origin(err: BaseException) -> str:
    """`function (file:line)` of the frame that called `sys.exit` (the last frame of its traceback)."""
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return "user code"
    last = frames[-1]
    return f"{last.name} ({last.filename}:{last.lineno})"


@contextmanager
def no_exit(what: str) -> Iterator[None]:
    """`sys.exit` (any code, 0 included) inside `what` becomes a `UserError` naming its caller: a callback
    that exits has not finished the run, and exit status 0 would tell a script the run succeeded."""
    try:
        yield
    except SystemExit as err:
        raise UserError(
            f"{_exit_origin(err)} called sys.exit({err.code!r}) during {what}, so the run did not finish; raise "
            "an exception to stop a run from a callback (--resume_from auto continues after the last checkpoint)."
        ) from None


#: Optional dependencies (import name -> the pip install that provides it): a command that needs a missing one
#: ends with one line naming the install, not a traceback.
OPTIONAL_DEPENDENCIES = {
    "sklearn": "pip install 'slca-peft[demo]' (or scikit-learn)",
    "matplotlib": "pip install 'slca-peft[plot]' (or matplotlib)",
    "timm": "pip install 'slca-peft[timm]' (or timm)",
}


def missing_optional_dependency(err: BaseException) -> str | None:
    """The one-line message for an `ImportError` of an optional dependency (anywhere in its cause chain), else
    None."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        name = (getattr(err, "name", None) or "").split(".")[0] if isinstance(err, ImportError) else ""
        if isinstance(err, ImportError) and not name:  # transformers' `requires_backends` names it in the text
            found = re.search(r"requires the (\w+) library", str(err))
            name = found.group(1) if found else ""
        if name in OPTIONAL_DEPENDENCIES:
            return f"this command needs the optional package {name!r}, which is not installed: " \
                   f"{OPTIONAL_DEPENDENCIES[name]}"
        err = err.__cause__ or err.__context__
    return None


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
    except UserError as err:
        print(f"{prog}: error: {one_line(err)} (run with --debug for the traceback)", file=sys.stderr)
        raise SystemExit(2) from None
    except ImportError as err:
        message = missing_optional_dependency(err)
        if message is None:
            raise
        print(f"{prog}: error: {message} (run with --debug for the traceback)", file=sys.stderr)
        raise SystemExit(2) from None
