"""Run a script and SIGKILL it from inside at an exact point: the first call of a chosen function,
after `skip` calls, once a marker path exists.

    python kill_at.py MODULE:ATTR.PATH MARKER SKIP SCRIPT [ARGS...]

Polling a process from outside cannot hit short phases such as classifier alignment or the middle
of a checkpoint write; this can, and the process still dies the way a crash kills it.
"""

import importlib
import os
import runpy
import signal
import sys
from pathlib import Path

target, marker, skip, script, *args = sys.argv[1:]
module_name, _, attr = target.partition(":")
owner = importlib.import_module(module_name)
*parents, name = attr.split(".")
for parent in parents:
    owner = getattr(owner, parent)
original = getattr(owner, name)
calls = 0


def wrapper(*a, **kw):
    global calls
    if Path(marker).exists():
        calls += 1
        if calls > int(skip):
            os.kill(os.getpid(), signal.SIGKILL)
    return original(*a, **kw)


setattr(owner, name, wrapper)
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
