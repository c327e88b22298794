"""One place that turns an exception into the line a user reads: `error: <file or key>:
<problem>`. The project's own exceptions carry such messages (ConfigError, CorpusError,
MissingAPIKeyError, SubmitError, the ValueError / FileNotFoundError of a bad input); Ray
wraps an exception raised in a task or actor (RayTaskError, and an actor whose
constructor raised: ActorDiedError with only the text of the cause) and Ray Data wraps
that again (UserCodeException): `user_message` finds the cause inside the wrappers.
"""

from __future__ import annotations

import re

# exception types whose message is written for the user (the file or key, the problem)
INPUT_ERRORS = ("ConfigError", "CorpusError", "MissingAPIKeyError", "SubmitError", "ValueError", "FileNotFoundError",
                "NotADirectoryError", "IsADirectoryError", "PermissionError", "FileExistsError")
_LAST_LINE = re.compile(r"^\s*(?:[\w.]+\.)?(\w+): (.+)$")


def _chain(exc: BaseException):
    """`exc` and every exception it wraps (Ray's `.cause`, `__cause__`, `__context__`)."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [getattr(e, "cause", None) if isinstance(getattr(e, "cause", None), BaseException) else None,
                 e.__cause__, e.__context__]


def _is_ray(e: BaseException) -> bool:
    return any(c.__module__.split(".")[0] == "ray" for c in type(e).__mro__)


def _from_text(text: str) -> str | None:
    """The last `SomeError: message` line of a traceback text whose type is an input error."""
    found = None
    for line in text.splitlines():
        m = _LAST_LINE.match(line)
        if m and m.group(1) in INPUT_ERRORS:
            found = m.group(2).strip()
    return found


def user_message(exc: BaseException) -> tuple[str, bool]:
    """(the message to print, whether it is a known input error). An unknown exception
    (a bug, most likely) comes as `Type: message`."""
    chain = list(_chain(exc))
    for e in chain:
        if not _is_ray(e) and any(c.__name__ in INPUT_ERRORS for c in type(e).__mro__):
            return str(e), True
    for e in chain:
        if _is_ray(e):
            found = _from_text(str(e))
            if found:
                return found, True
    inner = next((e for e in reversed(chain) if not _is_ray(e)), exc)
    return f"{type(inner).__name__}: {inner}".strip().splitlines()[0], False
