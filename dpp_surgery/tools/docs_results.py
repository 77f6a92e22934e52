"""The generated parts of the documentation: ``python -m dpp_surgery.tools.docs_results [--check]``.

Every results table of the pages under ``docs/`` sits between two marker comments::

    <!-- BEGIN generated: NAME -->
    ...
    <!-- END generated: NAME -->

and is made here from a committed record, with the renderer that wrote the record's own table: the studies'
``results/*/*.json`` (:mod:`dpp_surgery.tools.conversion_study`, ``experiments fashion-mnist``), the coverage CSVs
(:func:`dpp_surgery.tools.coverage.summarize`), the zoo's recipes and ``zoo/paper/`` (:mod:`dpp_surgery.tools.zoo`),
the benchmarks' ``results/bench/*.json`` (``python -m dpp_surgery.bench --record ...``, rendered by
:func:`dpp_surgery.tools.bench.render`, exactly as the benchmark printed them).
Each block also names its record and the record's date (its own, else the date of its last commit). The table of
what runs where (device x implementation x runtime) is one data structure, :data:`WHAT_RUNS_WHERE`, written to
``docs/snippets/what-runs-where.md``, which every page that speaks of it includes.

Without options the pages are rewritten in place; ``--check`` changes nothing and exits with 1, naming each page and
block that differs from its record.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import re
import subprocess
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ['BEGIN', 'END', 'BLOCKS', 'WHAT_RUNS_WHERE', 'SNIPPET', 'render_block', 'render_what_runs_where',
           'update_page', 'run', 'main']

BEGIN = '<!-- BEGIN generated: {} -->'
END = '<!-- END generated: {} -->'
_MARKER = re.compile(r'<!-- BEGIN generated: ([a-z0-9-]+) -->')
DOCS = 'docs'
SNIPPET = os.path.join(DOCS, 'snippets', 'what-runs-where.md')
_UNKNOWN_DATE = 'date unknown'

# the coverage CSVs: file -> (the command that wrote it, its machine, wall time, which summary lines the page shows)
# (the CSVs hold no command or machine; these are the runs' own, as recorded when they were committed)
COVERAGE_RUNS: Dict[str, Tuple[str, str, str, str]] = {
    'results/coverage.csv': (
        'python -m dpp_surgery.bench coverage --no-export',
        'AMD EPYC, CPU capability AVX512, native bfloat16, 2 cores, 2 threads, torch 2.14.1+cu130, Python 3.11.7, '
        'fused kernel on', '7 minutes', 'all'),
    'results/coverage_onnx.csv': (
        'python -m dpp_surgery.bench coverage --per-family 1 --csv results/coverage_onnx.csv',
        'AMD EPYC, CPU capability AVX512, native bfloat16, 2 cores, 2 threads, torch 2.14.1+cu130, Python 3.11.7, '
        'fused kernel on', '38 minutes', 'onnx'),
}

# What runs DPP where: (where, implementation, when it runs, how far it is tested and measured). One row per
# device x implementation x runtime; `dpp_surgery.layers.functional._choose` is the dispatch this describes.
WHAT_RUNS_WHERE: List[Tuple[str, str, str, str]] = [
    ('CPU, PyTorch (eager, autograd)', 'fused C++ kernel (`native/csrc/dpp2d.cpp`), the CPU kernel of the op '
     '`torch.ops.dpp_surgery.dpp2d`',
     "the default (`impl='auto'`) for CPU tensors: float32 and float64, float16 and bfloat16 (autocast's) on a "
     'float32 copy; windows of up to 64 positions; NCHW and channels_last. Compiled on first use by the system '
     'compiler', 'tested against a float64 loop reference and gradcheck; timed (results/speed)'),
    ('CPU, PyTorch', 'pure-PyTorch path (`layers/functional.py`)',
     "no C++ compiler (one warning), `DPP_SURGERY_NO_EXT=1`, windows of more than 64 positions, `impl='torch'`; "
     'what `torch.export`, ONNX export and `torch.jit.trace` record',
     'tested (it is the reference the kernels are tested against); timed (results/speed)'),
    ('CUDA, PyTorch (eager, autograd)', 'Triton kernels (`native/triton_dpp.py`), the CUDA kernel of the same op',
     "the default (`impl='auto'`) for CUDA tensors of every float dtype, in their own dtype, when Triton imports (it "
     'ships with the CUDA wheels of PyTorch); windows of up to 64 positions',
     "tested on CPU tensors in Triton's interpreter; `make test-gpu` has not run on a GPU; speed unmeasured"),
    ('CUDA, PyTorch', 'pure-PyTorch path',
     "Triton cannot be imported (one warning), windows of more than 64 positions, `impl='torch'`",
     'tested on the CPU only'),
    ('`torch.compile` (CPU or CUDA)', 'the op above as one opaque node: the CPU kernel or the Triton kernels',
     'whenever eager would run a kernel; the PyTorch path, where it runs, is compiled instead (the pooled form '
     'with the Lite guide, the stacked form with the Full guide)',
     'tested on the CPU; timed on the CPU (results/speed)'),
    ('ONNX, decomposed file', 'standard ONNX operators (`dpp_surgery.export.DECOMPOSED_OPS`)',
     "`export_onnx(..., mode='decomposed')`; runs in onnxruntime, OpenVINO and tract as written, and in any runtime "
     'with those operators', 'tested within 1e-4 of PyTorch in onnxruntime, OpenVINO and tract; timed there'),
    ('ONNX, custom file, onnxruntime CPU', 'native kernel (`native/csrc/dpp2d_ort.cpp`, the library of '
     '`dpp-surgery ort-library`)',
     "`export_onnx(..., mode='custom')`; `onnx_session` registers the library (or "
     '`register_custom_ops_library` in Python or C++); float32, CPU execution provider',
     'tested against PyTorch and against the functions; timed in onnxruntime'),
    ('ONNX, custom file, without the library', "the file's model-local ONNX functions (the decomposition)",
     "plain onnxruntime, any execution provider or dtype, or a failed build (`OrtKernelWarning`); other runtimes: "
     "export with `mode='decomposed'` (`runtime_session` refuses custom files for them)",
     'tested in onnxruntime on the CPU'),
    ('TensorRT', 'a decomposed file', 'not run by this project (no GPU available)', 'untested'),
]


def render_what_runs_where() -> str:
    """The Markdown of ``docs/snippets/what-runs-where.md`` from :data:`WHAT_RUNS_WHERE`."""
    lines = ['<!-- generated by `python -m dpp_surgery.tools.docs_results` from WHAT_RUNS_WHERE; do not edit -->',
             '', '| where | implementation | when it runs | tested / measured |', '|---|---|---|---|']
    lines += ['| ' + ' | '.join(row) + ' |' for row in WHAT_RUNS_WHERE]
    lines += ['', "`dpp_surgery.kernel_status()` says whether the CPU kernel is loaded and, under `'triton'`, whether "
                  "the Triton kernels can run; `impl='kernel'` or `impl='triton'` demands one and raises an error "
                  'naming why where it cannot run.']
    return '\n'.join(lines) + '\n'


# ---------------------------------------------------------------------------------------------------------------
# the blocks

def _read_json(root: str, rel: str) -> dict:
    with open(os.path.join(root, rel)) as f:
        return json.load(f)


def _commit_date(root: str, rel: str) -> str:
    """The date of the last commit of ``rel`` (YYYY-MM-DD), or 'date unknown' outside a git checkout."""
    try:
        out = subprocess.run(['git', 'log', '-1', '--format=%cs', '--', rel], cwd=root, capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return _UNKNOWN_DATE
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else _UNKNOWN_DATE


def _record_line(root: str, rels: Sequence[str]) -> str:
    parts = []
    for rel in rels:
        date = None
        if rel.endswith('.json'):
            data = _read_json(root, rel)
            date = (data.get('date') or (data.get('results') or {}).get('date')
                    or (data.get('meta') or {}).get('date'))
        parts.append(f'`{rel}` ({date[:10]}, the run\'s date)' if date else
                     f'`{rel}` ({_commit_date(root, rel)}, its last commit)')
    return 'Record: ' + ', '.join(parts) + '.'


def _study(folder: str, stem: str, render: Callable[[dict], str]) -> Callable[[str], str]:
    def make(root: str) -> str:
        rel = f'results/{folder}/{stem}.json'
        return render(_read_json(root, rel)) + '\n\n' + _record_line(root, [rel])
    return make


def _placement(record: dict) -> str:
    from .conversion_study import placement_table
    return placement_table(record)


def _heal(record: dict) -> str:
    from .conversion_study import heal_table
    return heal_table(record)


def _dpp_params(record: dict) -> str:
    from .conversion_study import dpp_params_table
    return dpp_params_table(record)


def _versus(record: dict) -> str:
    from .versus_study import versus_table
    return versus_table(record)


def _fashion(record: dict) -> str:
    from .experiments import fashion_mnist_table
    return fashion_mnist_table(record)


BENCH_RECORDS = 'results/bench'


def _bench(stem: str) -> Callable[[str], str]:
    """A benchmark's record, ``results/bench/STEM.json``: its command, then its Markdown as the benchmark printed
    it (the machine, the tables, the targets)."""
    def make(root: str) -> str:
        from .bench import render

        rel = f'{BENCH_RECORDS}/{stem}.json'
        record = _read_json(root, rel)
        return (f"Command: `{record['meta']['command']}`\n\n" + render(record).strip() + '\n\n'
                + _record_line(root, [rel]))
    return make


def _triton_summary(root: str) -> str:
    """``bench triton-report``'s record in short: one line per kernel x window x arch (the record has every
    kernel)."""
    from ..native.triton_aot import summary_table
    from .bench.common import checks_text

    rel = f'{BENCH_RECORDS}/triton_report.json'
    record = _read_json(root, rel)
    return '\n\n'.join([
        f"Command: `{record['meta']['command']}` (Triton {record['triton']}, {len(record['rows'])} kernels compiled "
        f"in {record['seconds']:.0f} s for {record['channels']} channels, on {record['machine']}; no GPU needed)",
        summary_table(record['rows']), checks_text(record['checks']), _record_line(root, [rel])])


def _read_coverage(path: str):
    """The rows of a coverage CSV as :class:`dpp_surgery.tools.coverage.FamilyResult` (ONNX columns in ``extra``)."""
    from .coverage import FamilyResult

    fields = {f.name: f.type for f in dataclasses.fields(FamilyResult) if f.name != 'extra'}
    casts = {'bool': lambda v: v == 'True', 'int': int, 'float': float, 'str': str}
    results = []
    with open(path, newline='') as f:
        for row in csv.DictReader(f):
            known = {k: casts[str(fields[k]).replace("'", '')](v) for k, v in row.items() if k in fields}
            results.append(FamilyResult(**known, extra={k: v for k, v in row.items() if k not in fields}))
    return results


def _coverage(rel: str) -> Callable[[str], str]:
    def make(root: str) -> str:
        from .coverage import summarize

        command, machine, wall, show = COVERAGE_RUNS[rel]
        lines = summarize(_read_coverage(os.path.join(root, rel))).splitlines()
        if show == 'onnx':  # the ONNX lines, each with the models it names
            kept, onnx = [], False
            for line in lines:
                onnx = line.startswith('ONNX ') or (onnx and line.startswith('- '))
                if onnx:
                    kept.append(line)
            lines = kept
        paragraphs = []
        for line in lines:  # one paragraph per line, the bullets under it as a list
            if line.startswith('- ') and paragraphs:
                paragraphs[-1] += '\n' + line
            else:
                paragraphs.append(line)
        return '\n\n'.join([f'Command: `{command}`  \nMachine: {machine}. Wall time {wall}.'] + paragraphs + [
            _record_line(root, [rel])])
    return make


def _zoo_recipes(root: str):
    from ..zoo import load_recipes
    return load_recipes(os.path.join(root, 'zoo'))


def _zoo(root: str) -> str:
    """The zoo's results block, exactly as ``python -m dpp_surgery.zoo table`` writes it into docs/results/zoo.md."""
    from ..zoo.runner import PAPER_MD, render_readme_block

    paper_path = os.path.join(root, 'zoo', PAPER_MD)
    paper = None
    if os.path.isfile(paper_path):
        with open(paper_path) as f:
            paper = f.read()
    return render_readme_block(_zoo_recipes(root), paper)


def _zoo_records(root: str) -> str:
    rels = [f'zoo/{name}.json' for name in _zoo_recipes(root)] + ['zoo/paper/paper.json']
    return _record_line(root, rels)


# block name -> what makes it from the checkout's root; a block that returns its own markers (the zoo's, which
# `python -m dpp_surgery.zoo table` writes too) is marked True
BLOCKS: Dict[str, Tuple[Callable[[str], str], bool]] = {
    'fashion-mnist': (_study('fashion_mnist', 'fashion_mnist', _fashion), False),
    'placement': (_study('placement', 'placement', _placement), False),
    'placement-block-10seeds': (_study('placement_block_10seeds', 'placement', _placement), False),
    'placement-resnet18': (_study('placement_resnet18', 'placement', _placement), False),
    'heal': (_study('heal', 'heal', _heal), False),
    'dpp-params': (_study('dpp_params', 'dpp_params', _dpp_params), False),
    'versus': (_study('versus', 'versus', _versus), False),
    'coverage': (_coverage('results/coverage.csv'), False),
    'coverage-onnx': (_coverage('results/coverage_onnx.csv'), False),
    'zoo': (_zoo, True),
    'zoo-records': (_zoo_records, False),
    **{f'bench-{stem.replace("_", "-")}': (_bench(stem), False)
       for stem in ('layer', 'train', 'onnx', 'onnx_layer', 'runtimes', 'init', 'preserve')},
    'triton-summary': (_triton_summary, False),
}


def render_block(name: str, root: str = '.') -> str:
    """The text of block ``name``, its two marker lines included."""
    if name not in BLOCKS:
        raise ValueError(f"unknown generated block {name!r}; available: {', '.join(BLOCKS)}")
    make, with_markers = BLOCKS[name]
    text = make(root)
    return text if with_markers else f'{BEGIN.format(name)}\n\n{text}\n\n{END.format(name)}'


def _same(page: str, generated: str) -> bool:
    """Equal, where a date that git could not give (no checkout) matches any date."""
    if _UNKNOWN_DATE not in generated:
        return page == generated
    pattern = re.escape(generated).replace(re.escape(_UNKNOWN_DATE), r'[0-9]{4}-[0-9]{2}-[0-9]{2}')
    return re.fullmatch(pattern, page) is not None


def update_page(path: str, root: str = '.', check: bool = False) -> List[str]:
    """Regenerate every block of the Markdown page ``path`` (or, with ``check``, only compare); returns the names of
    the blocks that differed. A block without its end marker, or an unknown name, is a ValueError."""
    with open(path) as f:
        text = f.read()
    out, pos, stale = [], 0, []
    for m in _MARKER.finditer(text):
        if m.start() < pos:
            continue
        name = m.group(1)
        end = text.find(END.format(name), m.end())
        if end < 0:
            raise ValueError(f'{path}: block {name!r} has no end marker {END.format(name)!r}')
        end += len(END.format(name))
        generated = render_block(name, root)
        if not _same(text[m.start():end], generated):
            stale.append(name)
        out += [text[pos:m.start()], generated]
        pos = end
    out.append(text[pos:])
    if stale and not check:
        from ..utils import write_text
        write_text(path, ''.join(out), overwrite=True)
    return stale


def _pages(root: str) -> List[str]:
    pages = []
    for folder, _, files in os.walk(os.path.join(root, DOCS)):
        pages += [os.path.join(folder, f) for f in files if f.endswith('.md')]
    return sorted(pages)


def run(root: str = '.', check: bool = False) -> List[str]:
    """Regenerate (or check) the snippet and every page's blocks under ``root``; returns one line per difference."""
    problems = []
    snippet = os.path.join(root, SNIPPET)
    want = render_what_runs_where()
    have = None
    if os.path.isfile(snippet):
        with open(snippet) as f:
            have = f.read()
    if have != want:
        problems.append(f'{SNIPPET}: differs from WHAT_RUNS_WHERE in dpp_surgery/tools/docs_results.py')
        if not check:
            from ..utils import write_text
            os.makedirs(os.path.dirname(snippet), exist_ok=True)
            write_text(snippet, want, overwrite=True)
    for page in _pages(root):
        rel = os.path.relpath(page, root)
        if os.path.abspath(page) == os.path.abspath(snippet):
            continue
        for name in update_page(page, root, check):
            problems.append(f'{rel}: block {name!r} differs from its record')
    return problems


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m dpp_surgery.tools.docs_results', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--check', action='store_true',
                        help='change nothing; exit with 1 and name every page whose tables differ from the records')
    parser.add_argument('--root', default='.', help='the checkout (default: the current folder)')
    args = parser.parse_args(argv)
    problems = run(args.root, args.check)
    for line in problems:
        print(line, file=sys.stderr if args.check else sys.stdout)
    if args.check and problems:
        print('run `python -m dpp_surgery.tools.docs_results` to regenerate them', file=sys.stderr)
        return 1
    if not args.check:
        print(f"{len(problems)} generated part(s) rewritten" if problems else 'every generated part is current')
    return 0


if __name__ == '__main__':
    sys.exit(main())
