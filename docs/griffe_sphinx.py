"""Griffe extension: the Sphinx markup of dpp_surgery's docstrings as Markdown, before mkdocstrings renders them.

The docstrings are written for both ``help()`` and the site, in Google style with Sphinx roles. This extension
rewrites each docstring of the package once it is loaded (the source files are not touched):

* ``:func:`name``` (and ``:class:``, ``:mod:``, ``:meth:``, ``:data:``, ``:attr:``, ``:exc:``, ``:obj:``,
  ``:const:``) becomes a cross-reference: ``name`` is resolved the way Python would from the docstring's object
  (its members, the module's imports, the enclosing scopes), and the link is an *optional* autoref, so a target that
  the site does not render (a private helper, ``torch.nn.Module``) shows as code instead of failing the build.
  ``~a.b.c`` shows ``c``, ``title <target>`` shows ``title``;
* ``:math:`x``` becomes inline math ``$x$`` and a ``.. math::`` block display math ``$$ ... $$`` (pymdownx.arithmatex);
* any other role becomes inline code, and a paragraph ending in ``::`` (a literal block) ends in ``:``;
* an ``Args:`` entry that documents several parameters at once (``kernel_size, stride: ...``, as Napoleon allows)
  becomes one entry per parameter, each with the description.

mkdocs.yml loads it with ``extensions: [docs/griffe_sphinx.py:SphinxRoles]``.
"""
from __future__ import annotations

import html
import re
from typing import Any, List, Optional

import griffe

PACKAGE = 'dpp_surgery'
REFERENCE_ROLES = ('func', 'class', 'mod', 'meth', 'data', 'attr', 'exc', 'obj', 'const')
_ROLE = re.compile(r':(?:py:)?(?P<role>[a-z]+):`(?P<text>[^`]+)`')
_EXPLICIT_TITLE = re.compile(r'(?P<title>.+?)\s*<(?P<target>[^<>]+)>', re.DOTALL)
_MATH_DIRECTIVE = re.compile(r'^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<first>.*)$')
_LITERAL_MARKER = re.compile(r'(?<=\S)::[ \t]*$')
_ARGS_SECTION = re.compile(
    r'^[ \t]*(?:Args|Arguments|Parameters|Keyword Args|Keyword Arguments|Other Parameters):[ \t]*$')
_GROUPED_ENTRY = re.compile(
    r'^(?P<indent>[ \t]+)(?P<names>\*{0,2}\w+(?:,[ \t]*\*{0,2}\w+)+):[ \t]+(?P<description>.*)$')


def _resolve(obj: griffe.Object, target: str) -> Optional[str]:
    """The dotted path of ``target`` as seen from ``obj``'s docstring, or None where griffe cannot find it."""
    collection = obj.modules_collection
    if target.startswith('.'):  # relative to the docstring's package (:mod:`.onnx`)
        module = obj if obj.is_module else obj.module
        package = module.path if module.is_init_module else module.path.rpartition('.')[0]
        level = len(target) - len(target.lstrip('.'))
        for _ in range(level - 1):
            package = package.rpartition('.')[0]
        target = f'{package}.{target.lstrip(".")}'
    candidates = [target]
    head, _, rest = target.partition('.')
    scope: Optional[griffe.Object] = obj
    while scope is not None:  # the name as the code at obj would see it: members, imports, enclosing scopes
        try:
            path = scope.resolve(head)
        except (griffe.NameResolutionError, AttributeError):
            path = None
        if path:
            candidates.append(f'{path}.{rest}' if rest else path)
            break
        scope = scope.parent
    for path in candidates:
        try:
            found = collection.get_member(path)
        except (KeyError, ValueError, AttributeError, IndexError):
            continue
        try:
            return found.final_target.path if found.is_alias else found.path
        except (griffe.AliasResolutionError, griffe.CyclicAliasError):
            return found.path
    return None


def _reference(obj: griffe.Object, text: str) -> str:
    """An optional autoref to the role's target, showing its title as code."""
    explicit = _EXPLICIT_TITLE.fullmatch(text.strip())
    target = (explicit['target'] if explicit else text).strip().lstrip('!')
    short = target.startswith('~')
    target = target.lstrip('~')
    title = explicit['title'] if explicit else (target.rpartition('.')[2] if short else target.lstrip('.'))
    path = _resolve(obj, target) or target.lstrip('.')
    title = ' '.join(title.split())
    return (f'<autoref identifier="{html.escape(path, quote=True)}" optional>'
            f'<code>{html.escape(title)}</code></autoref>')


def _role(obj: griffe.Object, match: re.Match) -> str:
    role, text = match['role'], match['text']
    if role == 'math':
        return f'${" ".join(text.split())}$'
    if role in REFERENCE_ROLES:
        return _reference(obj, text)
    return f'<code>{html.escape(" ".join(text.split()))}</code>'


def _math_blocks(text: str) -> str:
    """Each ``.. math::`` directive and its indented body as a ``$$`` block at the directive's indentation."""
    lines = text.split('\n')
    out = []
    i = 0
    while i < len(lines):
        match = _MATH_DIRECTIVE.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent = match['indent']
        body = [match['first']] if match['first'].strip() else []
        i += 1
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
            body.append(lines[i].strip())
            i += 1
        while body and not body[-1]:
            body.pop()
        if out and out[-1].strip():
            out.append('')
        out += [f'{indent}$$', *(f'{indent}{line}' for line in body if line), f'{indent}$$', '']
    return '\n'.join(out)


def _grouped_parameters(text: str) -> str:
    """Each ``a, b, c: description`` entry of an ``Args:`` section as one entry per name."""
    lines = text.split('\n')
    out: List[str] = []
    i = 0
    section_indent: Optional[int] = None
    while i < len(lines):
        line = lines[i]
        indent = len(line) - len(line.lstrip())
        if _ARGS_SECTION.match(line):
            section_indent = indent
            out.append(line)
            i += 1
            continue
        if section_indent is not None and line.strip() and indent <= section_indent:
            section_indent = None
        match = _GROUPED_ENTRY.match(line) if section_indent is not None else None
        if not match:
            out.append(line)
            i += 1
            continue
        body = [match['description']]
        i += 1
        while i < len(lines) and lines[i].strip() and len(lines[i]) - len(lines[i].lstrip()) > len(match['indent']):
            body.append(lines[i])
            i += 1
        for name in match['names'].split(','):
            out.append(f"{match['indent']}{name.strip()}: {body[0]}")
            out += body[1:]
    return '\n'.join(out)


def convert(obj: griffe.Object, text: str) -> str:
    """``text`` (a docstring of ``obj``) with its Sphinx markup as Markdown."""
    text = _grouped_parameters(text)
    text = _math_blocks(text)
    text = _ROLE.sub(lambda m: _role(obj, m), text)
    return '\n'.join(_LITERAL_MARKER.sub(':', line) for line in text.split('\n'))


class SphinxRoles(griffe.Extension):
    """Rewrites the Sphinx markup of every docstring in the package once it is loaded (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.path != PACKAGE:
            return
        seen = set()
        stack = [pkg]
        while stack:
            obj = stack.pop()
            if obj.is_alias or id(obj) in seen:
                continue
            seen.add(id(obj))
            if obj.docstring is not None:
                obj.docstring.value = convert(obj, obj.docstring.value)
            stack.extend(member for member in obj.members.values() if not member.is_alias)
