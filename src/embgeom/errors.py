"""The one error type embgeom raises for bad input.

Every message names the input that was wrong and how to fix it; the command line
prints it as one line and exits with status 2.

A message that names an option marks it with :func:`option`, so each caller reads
its own spelling: the Python API's parameter (``seq_len=4096``) in ``str(error)``,
the command line's flag (``--seq-len 4096``) in :meth:`EmbgeomError.command_line`.
"""
from __future__ import annotations

import re

_START, _VALUE, _END = "\x1f", "\x1e", "\x1d"
_MARKED = re.compile(f"{_START}([a-z_]+)(?:{_VALUE}(.*?))?{_END}", re.S)
_NO_VALUE = object()


def option(name: str, value=_NO_VALUE) -> str:
    """`name` (an AnalysisConfig field or analyze() parameter), with `value` if given,
    marked for :class:`EmbgeomError` to spell as the reader's interface does."""
    if value is _NO_VALUE:
        return f"{_START}{name}{_END}"
    return f"{_START}{name}{_VALUE}{value}{_END}"


def _spell(text: str, flags: bool) -> str:
    def one(m):
        name, value = m.group(1), m.group(2)
        if flags:
            flag = "--" + name.replace("_", "-")
            return flag if value is None else f"{flag} {value}"
        return name if value is None else f"{name}={value}"

    return _MARKED.sub(one, text)


class EmbgeomError(Exception):
    """Bad input or an unusable environment, with a message that says how to fix it.

    The one error type embgeom raises on purpose; the command line prints its message
    on one line (options spelled as flags, see `command_line`) and exits with status 2.

    >>> from embgeom import EmbgeomError, twonn
    >>> try:
    ...     twonn([[0.0, 1.0], [0.0, 1.0]])
    ... except EmbgeomError as exc:
    ...     print(exc)
    TwoNN needs at least 3 distinct points, got 1
    """

    def __str__(self) -> str:
        return _spell(super().__str__(), flags=False)

    def command_line(self) -> str:
        """The message with options spelled as command-line flags."""
        return _spell(super().__str__(), flags=True)
