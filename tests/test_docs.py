"""The documentation: the site builds strictly, shows no raw Sphinx markup, its reference pages cover the code, and
the Python examples of README.md and docs/ run (the rules: docs/internals/code-blocks.md). Also LICENSE and
CITATION.cff."""
import argparse
import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / 'docs'
PAGE_TIMEOUT = 180  # seconds for the default blocks of one page
LONG_PAGE_TIMEOUT = 900  # under -m slow / -m gpu
BUILD_TIMEOUT = 420
MARKER = re.compile(r'#\s*docs-test:\s*(?P<kind>\S+)(?:\s*\((?P<reason>.*)\))?\s*$')
MARKER_KINDS = ('slow', 'gpu', 'skip')
FENCE = re.compile(r'^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`]*)$')
SNIPPET = re.compile(r'^[ \t]*-{1,}8<-{1,}[ \t]+"(?P<path>[^"]+)"[ \t]*$')
SNIPPET_BASES = (DOCS, REPO)  # pymdownx.snippets' base_path in mkdocs.yml
RAW_MARKUP = re.compile(r':(?:py:)?(?:func|class|mod|meth|data|attr|exc|obj|const|math):`|\.\. math::')


# ---------------------------------------------------------------------------------------------------------------
# code blocks


class Block(NamedTuple):
    page: str  # path relative to the repo
    line: int  # line of the block's first code line in ``source`` (the file that holds it)
    source: str  # the file that holds the block (a page, or a snippet it includes)
    code: str
    kind: str  # 'run', 'slow', 'gpu' or 'skip'
    reason: str


def _lines_with_snippets(path: Path, depth: int = 0):
    """(file, line number, text) of every line of ``path``, with pymdownx.snippets includes expanded."""
    for number, text in enumerate(path.read_text(encoding='utf-8').splitlines(), 1):
        match = SNIPPET.match(text)
        if match and depth < 4:
            for base in SNIPPET_BASES:
                included = base / match['path']
                if included.is_file():
                    yield from _lines_with_snippets(included, depth + 1)
                    break
            continue
        yield path, number, text


def parse_blocks(path: Path) -> List[Block]:
    """The fenced blocks of a Markdown page whose info string is ``python``, with their marker."""
    page = path.relative_to(REPO).as_posix()
    blocks: List[Block] = []
    open_fence: Optional[re.Match] = None
    body: List[str] = []
    start = (path, 0)
    for source, number, text in _lines_with_snippets(path):
        if open_fence is None:
            match = FENCE.match(text)
            if match:
                open_fence, body, start = match, [], (source, number + 1)
            continue
        stripped = text.strip()
        if stripped.startswith(open_fence['fence'][0] * len(open_fence['fence'])) and not stripped.strip(
                open_fence['fence'][0]):
            info = open_fence['info'].strip().split()
            if info and info[0].lstrip('.{') == 'python':
                code = textwrap.dedent('\n'.join(line[len(open_fence['indent']):] if line.startswith(
                    open_fence['indent']) else line for line in body))
                first = code.lstrip('\n').split('\n', 1)[0].strip()
                kind, reason = 'run', ''
                marker = MARKER.fullmatch(first) if first.startswith('#') else None
                if marker:
                    kind, reason = marker['kind'], (marker['reason'] or '').strip()
                    if kind not in MARKER_KINDS or not reason:
                        kind, reason = 'bad', first
                blocks.append(Block(page, start[1], start[0].relative_to(REPO).as_posix(), code, kind, reason))
            open_fence = None
            continue
        body.append(text)
    return blocks


def _doc_pages() -> List[Path]:
    pages = [REPO / 'README.md'] if (REPO / 'README.md').is_file() else []
    pages += sorted(p for p in DOCS.rglob('*.md') if 'snippets' not in p.relative_to(DOCS).parts)
    return pages


ALL_BLOCKS: Dict[str, List[Block]] = {p.relative_to(REPO).as_posix(): parse_blocks(p) for p in _doc_pages()}


def _pages_with(*kinds: str) -> List[str]:
    return [page for page, blocks in ALL_BLOCKS.items() if any(b.kind in kinds for b in blocks)]


_DRIVER = r'''
import json, sys, traceback
blocks = json.load(sys.stdin)
namespace = {'__name__': '__main__'}
for block in blocks:
    print(f"--- docs-test: running the block at {block['source']}:{block['line']}", flush=True)
    code = compile('\n' * (block['line'] - 1) + block['code'], block['source'], 'exec')
    try:
        exec(code, namespace)
    except BaseException:
        traceback.print_exc()
        print(f"--- docs-test: FAILED: the block at {block['source']}:{block['line']}", flush=True)
        sys.exit(1)
'''

# A server that imports what every page imports (torch, timm, dpp_surgery: about 5 s of CPU) once, then runs each
# page in a child forked from it: a fresh process per page as before (its own namespace, modules loaded after the
# fork, working folder and output), without paying the imports again. Nothing has started a thread pool when it forks.
_SERVER = r'''
import json, os, sys, time
import numpy, torch, timm, dpp_surgery  # noqa: F401
driver = sys.argv[1]
reply = os.fdopen(os.dup(1), 'w', buffering=1)
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(request['cwd'])
            log = os.open('docs-test.log', os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(log, 1)
            os.dup2(log, 2)
            sys.stdout = open(1, 'w', buffering=1, closefd=False)
            sys.stderr = open(2, 'w', buffering=1, closefd=False)
            blocks = request['blocks']
            sys.stdin = __import__('io').StringIO(json.dumps(blocks))
            try:
                exec(compile(driver, '<docs-test driver>', 'exec'), {'__name__': '__main__'})
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    deadline = time.monotonic() + request['timeout']
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            reply.write(json.dumps({'rc': os.waitstatus_to_exitcode(status), 'timed_out': False}) + '\n')
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            reply.write(json.dumps({'rc': -9, 'timed_out': True}) + '\n')
            break
        time.sleep(0.05)
'''


@pytest.fixture(scope='module')
def page_server():
    env = dict(os.environ, HF_HUB_OFFLINE='1', MPLBACKEND='Agg', PYTHONDONTWRITEBYTECODE='1',
               PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get('PYTHONPATH')])]))
    server = subprocess.Popen([sys.executable, '-c', _SERVER, _DRIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env, cwd=REPO)
    yield server
    server.stdin.close()
    server.wait(timeout=60)
    server.stdout.close()


def _run_page(page: str, kinds, tmp_path: Path, timeout: int, server) -> None:
    blocks = [b for b in ALL_BLOCKS[page] if b.kind in kinds]
    bad = [b for b in ALL_BLOCKS[page] if b.kind == 'bad']
    if bad:
        pytest.fail('; '.join(f'{b.source}:{b.line - 1}: bad marker {b.reason!r}: the first line must be '
                              "'# docs-test: slow|gpu|skip (REASON)', with a reason" for b in bad))
    server.stdin.write(json.dumps({'blocks': [b._asdict() for b in blocks], 'cwd': str(tmp_path),
                                   'timeout': timeout}) + '\n')
    server.stdin.flush()
    line = server.stdout.readline()
    assert line, 'the docs-test server died'
    result = json.loads(line)
    out = (tmp_path / 'docs-test.log').read_text(errors='replace') if (tmp_path / 'docs-test.log').exists() else ''
    if result['timed_out']:
        started = re.findall(r'running the block at (\S+)', out)
        pytest.fail(f'{page}: the code blocks ran past {timeout} s (last block started: '
                    f'{started[-1] if started else "none"}); make them smaller or mark them slow')
    if result['rc'] != 0:
        pytest.fail(f'{page}: a code block failed\n{out[-10000:]}', pytrace=False)


def test_page_runner_reports_a_failing_block_and_isolates_pages(tmp_path, page_server, monkeypatch):
    """A failing block fails its page with the block's place and traceback; a page does not see the namespace or
    the modules a page before it made."""
    def block(code, line=3):
        return Block('fake.md', line, 'fake.md', code, 'run', '')
    monkeypatch.setitem(ALL_BLOCKS, 'fake.md', [block('import json\nstate = 1'), block('raise ValueError("boom")', 9)])
    (tmp_path / 'a').mkdir()
    with pytest.raises(pytest.fail.Exception, match=r'(?s)fake\.md: a code block failed.*fake\.md", line 9.*boom'):
        _run_page('fake.md', ('run',), tmp_path / 'a', PAGE_TIMEOUT, page_server)
    monkeypatch.setitem(ALL_BLOCKS, 'fake.md', [block('assert "state" not in globals()\n'
                                                      'import sys\nassert "json" not in globals()')])
    (tmp_path / 'b').mkdir()
    _run_page('fake.md', ('run',), tmp_path / 'b', PAGE_TIMEOUT, page_server)


@pytest.mark.parametrize('page', _pages_with('run', 'bad'))
def test_code_blocks(page, tmp_path, page_server):
    """The page's unmarked Python blocks run, in order, in one namespace."""
    _run_page(page, ('run',), tmp_path, PAGE_TIMEOUT, page_server)


@pytest.mark.slow
@pytest.mark.parametrize('page', _pages_with('slow'))
def test_code_blocks_slow(page, tmp_path, page_server):
    """The page's blocks marked slow, after its unmarked ones."""
    _run_page(page, ('run', 'slow'), tmp_path, LONG_PAGE_TIMEOUT, page_server)


@pytest.mark.gpu
@pytest.mark.parametrize('page', _pages_with('gpu'))
def test_code_blocks_gpu(page, tmp_path, page_server):
    """The page's blocks marked gpu, after its unmarked ones, on a CUDA device."""
    import torch
    if not torch.cuda.is_available():
        pytest.skip('no CUDA device')
    _run_page(page, ('run', 'gpu'), tmp_path, LONG_PAGE_TIMEOUT, page_server)


_SKIPPED = [b for blocks in ALL_BLOCKS.values() for b in blocks if b.kind == 'skip']


@pytest.mark.parametrize('block', _SKIPPED, ids=[f'{b.source}:{b.line - 1}' for b in _SKIPPED])
def test_code_blocks_skipped(block):
    """Blocks marked skip never run; each is reported with its reason."""
    pytest.skip(f'{block.source}:{block.line - 1}: {block.reason}')


def test_block_parser(tmp_path, monkeypatch):
    page = tmp_path / 'page.md'
    page.write_text(textwrap.dedent('''\
        # Title

        ```python
        x = 1
        ```

        ```bash
        echo not python
        ```

        - item

            ```python
            # docs-test: slow (ten minutes of training)
            y = x + 1
            ```

        ```python
        # docs-test: skip
        ```
        '''))
    monkeypatch.setattr(sys.modules[__name__], 'REPO', tmp_path)
    blocks = parse_blocks(page)
    assert [(b.line, b.kind, b.code.strip()) for b in blocks] == [
        (4, 'run', 'x = 1'),
        (14, 'slow', '# docs-test: slow (ten minutes of training)\ny = x + 1'),
        (19, 'bad', '# docs-test: skip'),
    ]
    assert blocks[1].reason == 'ten minutes of training'


# ---------------------------------------------------------------------------------------------------------------
# the site


def _have_mkdocs() -> Optional[str]:
    for module in ('mkdocs', 'material', 'mkdocstrings', 'mkdocstrings_handlers.python', 'pymdownx'):
        try:
            if importlib.util.find_spec(module) is None:
                return module
        except ModuleNotFoundError:
            return module
    return None


@pytest.fixture(scope='module')
def site(tmp_path_factory):
    """The site built with ``mkdocs build --strict``: its folder."""
    missing = _have_mkdocs()
    if missing:
        pytest.skip(f"{missing} is not installed: pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp('site')
    env = dict(os.environ, DISABLE_MKDOCS_2_WARNING='true', NO_MKDOCS_2_WARNING='1', HF_HUB_OFFLINE='1')
    result = subprocess.run([sys.executable, '-m', 'mkdocs', 'build', '--strict', '-f', str(REPO / 'mkdocs.yml'),
                             '-d', str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=BUILD_TIMEOUT)
    if result.returncode != 0:
        pytest.fail(f'mkdocs build --strict failed:\n{result.stderr[-8000:]}', pytrace=False)
    return out


def test_site_builds(site):
    for page in ('index.html', 'reference/api/index.html', 'reference/cli/index.html', 'changelog/index.html'):
        assert (site / page).is_file(), page


def _visible(html: str) -> str:
    """The page's text outside code: raw markup inside a code sample is fine."""
    html = re.sub(r'<(pre|code|script)\b.*?</\1>', ' ', html, flags=re.DOTALL)
    return re.sub(r'<[^>]+>', ' ', html)


def test_no_raw_sphinx_markup(site):
    pages = sorted(site.rglob('*.html'))
    assert pages
    bad = {}
    for page in pages:
        found = RAW_MARKUP.findall(_visible(page.read_text(encoding='utf-8')))
        if found:
            bad[page.relative_to(site).as_posix()] = sorted(set(found))
    assert not bad, f'raw Sphinx markup in the built pages: {bad}'


def test_docstring_markup_rendered(site):
    """DPP2d's ``.. math::`` block and roles come out as math and links."""
    html = (site / 'reference/api/index.html').read_text(encoding='utf-8')
    start = html.index('id="dpp_surgery.DPP2d"')
    section = html[start:start + 40000]
    assert '<div class="arithmatex">' in section and r'\Omega_p' in section
    assert '<span class="arithmatex">' in section
    assert 'href="#dpp_surgery.convert"' in section or 'href="./#dpp_surgery.convert"' in section


def test_cli_page_covers_every_command(site):
    sys.path.insert(0, str(DOCS))
    try:
        import gen_cli
    finally:
        sys.path.remove(str(DOCS))
    html = (site / 'reference/cli/index.html').read_text(encoding='utf-8')
    for prog, module, _ in gen_cli.PROGRAMS:
        parser = importlib.import_module(module).build_parser()
        assert f'id="{gen_cli._slug(prog)}"' in html, prog
        for name, sub in gen_cli._subcommands(parser):
            assert f'id="{gen_cli._slug(f"{prog} {name}")}"' in html, f'{prog} {name}'
            for action in sub._actions:
                if action.option_strings and action.help != argparse.SUPPRESS:
                    assert action.option_strings[-1] in html, f'{prog} {name} {action.option_strings}'


def test_cli_page_is_generated():
    assert not (DOCS / 'reference' / 'cli.md').exists(), 'docs/reference/cli.md is generated at build time'


# ---------------------------------------------------------------------------------------------------------------
# the reference pages cover the code (no build needed)


def _python_sources() -> List[Path]:
    return sorted((REPO / 'dpp_surgery').rglob('*.py'))


def test_api_page_lists_the_public_api():
    import dpp_surgery
    import dpp_surgery.export

    text = (DOCS / 'reference' / 'api.md').read_text(encoding='utf-8')
    documented = {line.split()[1].rpartition('.')[2] for line in text.splitlines() if line.startswith('::: ')}
    public = (set(dpp_surgery.__all__) - {'__version__'}) | set(dpp_surgery.export.__all__)
    assert not public - documented, f'public names missing from docs/reference/api.md: {sorted(public - documented)}'


_ENV_PATTERNS = (
    re.compile(r'os\.environ(?:\.get|\.setdefault|\.pop)?\(\s*[\'"]([A-Z][A-Z0-9_]*)[\'"]'),
    re.compile(r'os\.environ\[\s*[\'"]([A-Z][A-Z0-9_]*)[\'"]\s*\]'),
    re.compile(r'getenv\(\s*[\'"]([A-Z][A-Z0-9_]*)[\'"]'),
    re.compile(r'disable_env\s*=\s*[\'"]([A-Z][A-Z0-9_]*)[\'"]'),
    re.compile(r'^[A-Z_]*_ENV\s*=\s*[\'"]([A-Z][A-Z0-9_]*)[\'"]', re.MULTILINE),
)


def environment_variables() -> Dict[str, str]:
    """Every environment variable the package's code reads: name -> the file that reads it."""
    found = {}
    sources = _python_sources() + sorted((REPO / 'dpp_surgery').rglob('*.cpp')) + sorted(
        (REPO / 'dpp_surgery').rglob('*.h'))
    for path in sources:
        text = path.read_text(encoding='utf-8')
        for pattern in _ENV_PATTERNS:
            for name in pattern.findall(text):
                found.setdefault(name, path.relative_to(REPO).as_posix())
    return found


def test_environment_page_lists_every_variable():
    variables = environment_variables()
    assert {'DPP_SURGERY_CACHE', 'ORT_INCLUDE_DIR', 'DPP_SURGERY_ORT_ISA', 'TRITON_INTERPRET'} <= set(variables)
    text = (DOCS / 'reference' / 'environment.md').read_text(encoding='utf-8')
    rows = '\n'.join(line for line in text.splitlines() if line.startswith('|'))
    missing = {name: where for name, where in variables.items() if f'`{name}`' not in rows}
    assert not missing, f'environment variables read but not in docs/reference/environment.md: {missing}'


def test_errors_page_lists_every_error_and_warning():
    classes = {}
    for path in _python_sources():
        for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
            if (isinstance(node, ast.ClassDef) and not node.name.startswith('_')
                    and re.search(r'(Error|Warning)$', node.name)):
                classes[node.name] = path.relative_to(REPO).as_posix()
    assert {'CheckpointError', 'NoEffectWarning', 'MissingExtraError'} <= set(classes)
    text = (DOCS / 'reference' / 'errors.md').read_text(encoding='utf-8')
    missing = {name: where for name, where in classes.items() if f'`{name}`' not in text}
    assert not missing, f'error and warning classes not in docs/reference/errors.md: {missing}'


def test_checkpoint_page_matches_the_limits():
    from dpp_surgery import checkpoint

    text = (DOCS / 'reference' / 'checkpoint.md').read_text(encoding='utf-8')
    for name in checkpoint.MODEL_KWARGS:
        assert f'`{name}`' in text, name
    for name in ('MAX_CONVERSIONS', 'MAX_CHANNELS', 'MAX_IMAGE_SIDE', 'MAX_NUM_CLASSES', 'MAX_POLICY_ENTRIES',
                 'MAX_NAME_LENGTH'):
        assert f'| `{name}` | {getattr(checkpoint, name)} |' in text, name
    assert checkpoint.FORMAT in text


# ---------------------------------------------------------------------------------------------------------------
# LICENSE and CITATION.cff


def test_license_is_apache_2():
    text = (REPO / 'LICENSE').read_text(encoding='utf-8')
    assert text.lstrip().startswith('Apache License')
    assert 'Version 2.0, January 2004' in text and 'END OF TERMS AND CONDITIONS' in text


def test_citation_cff():
    yaml = pytest.importorskip('yaml')
    from dpp_surgery.version import __version__

    data = yaml.safe_load((REPO / 'CITATION.cff').read_text(encoding='utf-8'))
    assert data['cff-version'] == '1.2.0'
    assert data['version'] == __version__
    assert data['license'] == 'Apache-2.0'
    paper = data['preferred-citation']
    assert paper['type'] == 'conference-paper'
    assert 'Detail-Preserving Pooling' in paper['title']
    assert [a['family-names'] for a in paper['authors']] == ['Saeedan', 'Weber', 'Goesele', 'Roth']
