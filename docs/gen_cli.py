"""Generate the command-line reference (reference/cli.md) from the programs' argparse parsers.

docs/hooks.py adds the page that :func:`render` returns to the site at build time, so it always matches the code:
each program's ``build_parser()`` gives its ``--help`` text and a table of its options, and each subcommand gets the
same. ``python docs/gen_cli.py`` prints the page.
"""
from __future__ import annotations

import argparse
import html
import importlib
import os
from typing import Iterator, List, Tuple

# (program as typed, module holding build_parser, what it is for)
PROGRAMS: Tuple[Tuple[str, str, str], ...] = (
    ('dpp-surgery', 'dpp_surgery.cli',
     'The main command (also `python -m dpp_surgery`): plan, convert, fine-tune, evaluate and export models, and '
     'write the onnxruntime custom-op library.'),
    ('python -m dpp_surgery.bench', 'dpp_surgery.tools.bench',
     'Benchmarks (also `dpp-surgery bench`): speed, memory and closeness of DPP against the pools it replaces, '
     'ONNX runtimes, training steps.'),
    ('python -m dpp_surgery.experiments', 'dpp_surgery.tools.experiments',
     'The experiments behind the results pages: Fashion-MNIST fine-tuning, the paper\'s comparison, and the '
     'conversion studies (placement, healing, what DPP parameters learn).'),
    ('python -m dpp_surgery.zoo', 'dpp_surgery.zoo.runner',
     'The model zoo: list the recipes, run one (fine-tune and measure original against converted), regenerate its '
     'table.'),
    ('python -m dpp_surgery.demo', 'dpp_surgery.tools.demo',
     'The end-to-end demo: pool a photo, convert and fine-tune EfficientNet-Lite0 on Fashion-MNIST, export it to ONNX '
     'and run it in onnxruntime.'),
    ('python -m dpp_surgery.tools.gpu_check', 'dpp_surgery.tools.gpu_check',
     'The GPU check (`make gpu-check`, `make gpu-check-dry`): Triton kernel parity, torch.compile, autocast, '
     'determinism and short benchmarks on a machine that already has torch and Triton; installs nothing.'),
)
HELP_COLUMNS = 100  # --help is wrapped at this width whatever the terminal


def _slug(text: str) -> str:
    return '-'.join(''.join(c if c.isalnum() else ' ' for c in text.lower()).split())


def _cell(text: str) -> str:
    """Text safe in one Markdown table cell."""
    text = ' '.join(str(text).split())
    return html.escape(text, quote=False).replace('|', '\\|').replace('*', '\\*')


def _help_text(parser: argparse.ArgumentParser) -> str:
    old = os.environ.get('COLUMNS')
    os.environ['COLUMNS'] = str(HELP_COLUMNS)
    try:
        return parser.format_help().rstrip()
    finally:
        if old is None:
            del os.environ['COLUMNS']
        else:
            os.environ['COLUMNS'] = old


def _subcommands(parser: argparse.ArgumentParser) -> List[Tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices.items())
    return []


def _argument(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ''
    if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
        return ' \\| '.join(f'`{c}`' for c in action.choices)
    metavar = action.metavar or (action.dest.upper() if action.option_strings else action.dest)
    if isinstance(metavar, tuple):
        metavar = ' '.join(metavar)
    if action.nargs in ('+', '*'):
        metavar += ' ...'
    elif isinstance(action.nargs, int) and action.nargs > 1 and ' ' not in metavar:
        metavar = ' '.join([metavar] * action.nargs)
    return f'`{metavar}`'


def _default(action: argparse.Action) -> str:
    default = action.default
    if (default is None or default is argparse.SUPPRESS or action.required or not action.option_strings
            or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
        return ''
    if isinstance(action, argparse.BooleanOptionalAction) or isinstance(default, bool):
        return 'on' if default else 'off'
    if isinstance(default, (list, tuple)):
        default = ' '.join(map(str, default))
    return f'`{default}`'


def _options_table(parser: argparse.ArgumentParser) -> List[str]:
    formatter = parser._get_formatter()
    rows = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, (argparse._SubParsersAction, argparse._HelpAction)):
            continue
        name = ', '.join(f'`{s}`' for s in action.option_strings) if action.option_strings else f'`{action.dest}`'
        required = ' (required)' if action.required and action.option_strings else ''
        description = formatter._expand_help(action) if action.help else ''
        rows.append(f'| {name}{required} | {_argument(action)} | {_default(action)} | {_cell(description)} |')
    if not rows:
        return []
    return ['| option | argument | default | description |', '|---|---|---|---|', *rows, '']


def _command(prog: str, parser: argparse.ArgumentParser, level: int) -> Iterator[str]:
    yield f'{"#" * level} `{prog}` {{#{_slug(prog)}}}'
    yield ''
    subcommands = _subcommands(parser)
    passthrough = not any(a.option_strings for a in parser._actions) and any(
        a.nargs == argparse.REMAINDER for a in parser._actions)
    if passthrough:  # `dpp-surgery bench`: hands its arguments to another program
        yield 'Takes the arguments of [`python -m dpp_surgery.bench`](#python-m-dpp-surgery-bench).'
        yield ''
        return
    yield '```text'
    yield _help_text(parser)
    yield '```'
    yield ''
    yield from _options_table(parser)
    if subcommands:
        names = ', '.join(f'[`{name}`](#{_slug(f"{prog} {name}")})' for name, _ in subcommands)
        yield f'Commands: {names}.'
        yield ''
    for name, sub in subcommands:
        yield from _command(f'{prog} {name}', sub, level + 1)


def render() -> str:
    """The page: every program of :data:`PROGRAMS` with its subcommands."""
    lines = [
        '# Command line',
        '',
        '<!-- generated by docs/gen_cli.py from the argparse parsers when the site is built: edit the parsers -->',
        '',
        'Every program of the package, with its `--help` and a table of its options, generated from the programs\' '
        'own parsers when the site is built. Flags follow timm\'s `train.py` names where one exists; the names of '
        'earlier versions are still read.',
        '',
        '| program | what it does |',
        '|---|---|',
    ]
    lines += [f'| [`{prog}`](#{_slug(prog)}) | {_cell(what)} |' for prog, _, what in PROGRAMS]
    lines.append('')
    for prog, module, _ in PROGRAMS:
        parser = importlib.import_module(module).build_parser()
        lines += list(_command(prog, parser, 2))
    return '\n'.join(lines).rstrip() + '\n'


if __name__ == '__main__':
    print(render(), end='')
