"""Text helpers shared by the command lines, benchmarks and reports."""
import difflib
import re
from typing import Iterable, Optional

__all__ = ['first_line', 'did_you_mean']

_ANSI = re.compile(r'\x1b\[[0-9;]*m')


def first_line(error: BaseException, fallback: Optional[str] = None) -> str:
    """The first line of ``str(error)`` without terminal colour codes (torch.onnx colours its messages); if that is
    empty, ``fallback`` (default: the exception's class name)."""
    text = _ANSI.sub('', str(error)).strip()
    if text:
        return text.splitlines()[0]
    return type(error).__name__ if fallback is None else fallback


def did_you_mean(name: object, valid: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``valid`` to ``name``, or ``''`` when none is close."""
    close = difflib.get_close_matches(str(name), list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ''
