"""A small engine that rewrites modules in place and can take every change back; it knows nothing of DPP.

Each function makes one change and records it in an :class:`Undo`: :func:`set_child` (replace a submodule, its
hooks moving to the new one), :func:`add_child`, :func:`set_attr` (a stride, ...) and :func:`set_class`.
:meth:`Undo.revert` restores the modules, newest change first; :attr:`Undo.changes` is the record of what changed.

    >>> undo = Undo()
    >>> set_attr(model.conv1, 'stride', (1, 1), undo, where='conv1')  # doctest: +SKIP
    >>> undo.revert()  # doctest: +SKIP
"""
from __future__ import annotations

from typing import Any, Callable, List, NamedTuple

from torch import nn

__all__ = ['Undo', 'Change', 'set_child', 'add_child', 'set_attr', 'set_class']

# the hook dictionaries a module keeps: a replacement takes them over (timm's FeatureHookNet, users' own hooks)
_HOOK_DICTS = ('_forward_hooks', '_forward_pre_hooks', '_forward_hooks_with_kwargs', '_forward_pre_hooks_with_kwargs',
               '_forward_hooks_always_called')


class Change(NamedTuple):
    """One change: ``kind`` ('set_child', 'add_child', 'set_attr', 'set_class'), the module's name (``where``, as the
    caller gave it), the attribute or child name, and the value before and after (modules and classes by name)."""
    kind: str
    where: str
    name: str
    before: str
    after: str


def _describe(value: Any) -> str:
    if isinstance(value, type):
        return value.__qualname__
    if isinstance(value, nn.Module):
        return type(value).__name__
    return repr(value)


class Undo:
    """The changes made so far, each with the step that takes it back."""

    def __init__(self) -> None:
        self._steps: List[Callable[[], None]] = []
        self.changes: List[Change] = []

    def record(self, change: Change, revert: Callable[[], None]) -> None:
        self.changes.append(change)
        self._steps.append(revert)

    def revert(self) -> None:
        """Take every change back, newest first; afterwards nothing is recorded."""
        while self._steps:
            self._steps.pop()()
        self.changes.clear()

    def __len__(self) -> int:
        return len(self.changes)


def set_child(root: nn.Module, name: str, new: nn.Module, undo: Undo) -> nn.Module:
    """Replace the submodule ``name`` (dotted) of ``root`` by ``new`` under the same attribute, so a container keeps
    its order and length; the hooks registered on the old module move to the new one. Returns the old module."""
    parent_name, _, child = name.rpartition('.')
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    for attr in _HOOK_DICTS:
        hooks = getattr(old, attr, None)
        if hooks:
            getattr(new, attr).update(hooks)
    setattr(parent, child, new)
    undo.record(Change('set_child', parent_name, child, _describe(old), _describe(new)),
                lambda: setattr(parent, child, old))
    return old


def add_child(module: nn.Module, name: str, child: nn.Module, undo: Undo, where: str = '') -> None:
    """Add ``child`` to ``module`` as ``name``; ValueError if ``module`` already has an attribute of that name."""
    if hasattr(module, name):
        raise ValueError(f'{type(module).__name__} already has an attribute named {name}')
    module.add_module(name, child)
    undo.record(Change('add_child', where, name, '', _describe(child)), lambda: module._modules.pop(name, None))


def set_attr(obj: Any, name: str, value: Any, undo: Undo, where: str = '') -> None:
    """Set ``obj.name`` to ``value`` (a module's stride, ...)."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    undo.record(Change('set_attr', where, name, _describe(old), _describe(value)), lambda: setattr(obj, name, old))


def set_class(module: nn.Module, cls: type, undo: Undo, where: str = '') -> None:
    """Give ``module`` the class ``cls`` (a subclass of its own that changes ``forward``); its state stays."""
    old = module.__class__
    module.__class__ = cls
    undo.record(Change('set_class', where, '__class__', _describe(old), _describe(cls)),
                lambda: setattr(module, '__class__', old))
