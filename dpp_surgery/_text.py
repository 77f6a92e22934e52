"""Text helpers shared by the command lines, benchmarks and reports."""
import re
from typing import Optional

__all__ = ['first_line']

_ANSI = re.compile(r'\x1b\[[0-9;]*m')


def first_line(error: BaseException, fallback: Optional[str] = None) -> str:
    """The first line of ``str(error)`` without terminal colour codes (torch.onnx colours its messages); if that is
    empty, ``fallback`` (default: the exception's class name)."""
    text = _ANSI.sub('', str(error)).strip()
    if text:
        return text.splitlines()[0]
    return type(error).__name__ if fallback is None else fallback
