"""Failpoints: named places where a test can make the process die, or a write fail.

Reliability tests set ``SMLREC_FAILPOINTS`` in a child process to crash it at an exact
point (in the middle of writing model weights, between writing a pointer's temporary file
and renaming it, inside BentoML packaging, between two Feast views...) or to make a write
fail as a full or read-only disk would, then check that nothing was lost. With the variable
unset (always, in production) a failpoint is one dictionary lookup.

``SMLREC_FAILPOINTS`` is a comma-separated list of ``point[@subject-glob][=action]``:

- ``point``: the name given at the call site (see :data:`POINTS`);
- ``subject-glob``: an ``fnmatch`` pattern on the call site's subject (a path, a step or view
  name); omitted, every subject matches;
- ``action``: ``kill`` (default: SIGKILL this process, as a power cut or the OOM killer
  would), ``enospc`` / ``erofs`` / ``eio`` (raise the matching ``OSError``), or ``kill-after-N``
  (kill at the N-th match).

Example: ``SMLREC_FAILPOINTS="write.partial@*/weights.safetensors"``.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import signal
from functools import cache

ENV = "SMLREC_FAILPOINTS"

POINTS = {
    "write.open": "before a file's temporary copy is opened for writing",
    "write.partial": "half-way through writing a file's temporary copy",
    "write.before_rename": "after the temporary copy is complete, before it replaces the file",
    "feast.materialize": "between two feature views loaded into the online store",
    "package.inside": "inside BentoML packaging, after the bundle is written, before the "
    "model is committed to the store",
    "step.after": "after a pipeline step returned (a step boundary)",
    "feedback.write": "before a group of feedback events is appended to the log (nothing of "
    "it acknowledged yet)",
}

_ERRORS = {"enospc": errno.ENOSPC, "erofs": errno.EROFS, "eio": errno.EIO}
_hits: dict[str, int] = {}


@cache
def _parse(spec: str) -> tuple[tuple[str, str, str], ...]:
    rules = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        target, _, action = item.partition("=")
        point, _, subject = target.partition("@")
        if point not in POINTS:
            raise ValueError(f"{ENV}: unknown failpoint {point!r}; known: {', '.join(POINTS)}")
        rules.append((point, subject or "*", action or "kill"))
    return tuple(rules)


def failpoint(point: str, subject: str = "") -> None:
    """Crash or fail here if ``$SMLREC_FAILPOINTS`` asks for ``point`` on ``subject``."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    for name, pattern, action in _parse(spec):
        if name != point or not fnmatch.fnmatchcase(subject, pattern):
            continue
        if action in _ERRORS:
            code = _ERRORS[action]
            raise OSError(code, os.strerror(code), subject)
        if action.startswith("kill-after-"):
            key = f"{name}@{pattern}"
            _hits[key] = _hits.get(key, 0) + 1
            if _hits[key] < int(action.removeprefix("kill-after-")):
                continue
        elif action != "kill":
            raise ValueError(f"{ENV}: unknown action {action!r} for {point}")
        os.kill(os.getpid(), signal.SIGKILL)
