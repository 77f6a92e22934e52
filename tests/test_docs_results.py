"""The generated parts of the docs (``python -m dpp_surgery.tools.docs_results``): the committed pages equal what their
records give, ``--check`` names a page that disagrees, and the buys-and-costs box quotes only figures its results
pages hold."""
import os
import re
import shutil

import pytest

from dpp_surgery.tools import docs_results
from dpp_surgery.tools.docs_results import BEGIN, END, main, render_block

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_committed_pages_equal_their_records(capsys):
    assert main(['--check', '--root', REPO]) == 0, capsys.readouterr().err


def test_every_block_is_on_a_page():
    pages = ''
    for folder, _, files in os.walk(os.path.join(REPO, 'docs')):
        for name in files:
            if name.endswith('.md'):
                with open(os.path.join(folder, name)) as f:
                    pages += f.read()
    for name in docs_results.BLOCKS:
        assert pages.count(BEGIN.format(name)) == 1 and pages.count(END.format(name)) == 1, name


def _copy(tmp_path):
    for rel in ('docs', 'results', 'zoo'):
        shutil.copytree(os.path.join(REPO, rel), tmp_path / rel)
    return tmp_path


def test_check_names_the_page_and_write_mends_it(tmp_path, capsys, monkeypatch):
    root = _copy(tmp_path)
    monkeypatch.setattr(docs_results, '_commit_date', lambda root, rel: '2026-01-01')
    page = root / 'docs' / 'results' / 'healing.md'
    text = page.read_text()
    page.write_text(text.replace('| block |', '| block (edited) |', 1))
    (root / 'docs' / 'snippets' / 'what-runs-where.md').write_text('stale\n')
    assert main(['--check', '--root', str(root)]) == 1
    err = capsys.readouterr().err
    assert "docs/results/healing.md: block 'heal' differs from its record" in err
    assert 'docs/snippets/what-runs-where.md' in err and 'placement.md' not in err.split('what-runs-where')[0]
    assert main(['--root', str(root)]) == 0
    assert '(edited)' not in page.read_text()
    assert main(['--check', '--root', str(root)]) == 0


def test_a_block_without_its_end_or_an_unknown_name_is_refused(tmp_path):
    page = tmp_path / 'p.md'
    page.write_text(f"{BEGIN.format('heal')}\nno end\n")
    with pytest.raises(ValueError, match="block 'heal' has no end marker"):
        docs_results.update_page(str(page), REPO, check=True)
    with pytest.raises(ValueError, match="unknown generated block 'nope'; available: "):
        render_block('nope', REPO)


def test_an_unknown_commit_date_matches_any_date(monkeypatch):
    monkeypatch.setattr(docs_results, '_commit_date', lambda root, rel: docs_results._UNKNOWN_DATE)
    generated = render_block('heal', REPO)
    assert docs_results._UNKNOWN_DATE in generated
    assert docs_results._same(generated.replace(docs_results._UNKNOWN_DATE, '2026-12-04'), generated)
    assert not docs_results._same(generated.replace('| block |', '| x |'), generated)


def test_the_zoo_block_is_what_zoo_table_writes():
    from dpp_surgery.zoo.runner import README_BEGIN, README_END
    block = render_block('zoo', REPO)
    assert block.startswith(README_BEGIN) and block.endswith(README_END)


@pytest.mark.parametrize('path', ['README.md', 'docs/results/index.md', 'docs/index.md'])
def test_the_buys_and_costs_box_quotes_its_results_pages(path):
    """Every decimal figure of a row of the box appears on a results page that row links to."""
    with open(os.path.join(REPO, path)) as f:
        text = f.read()
    start = text.index('| | as measured | results |')
    rows = text[start:].split('\n\n')[0].splitlines()[2:]
    assert len(rows) >= 5
    here = os.path.dirname(os.path.join(REPO, path))
    for row in rows:
        figures = re.findall(r'[+-]?\d+\.\d+', row.split('](')[0] if '](' in row else row)
        links = {os.path.normpath(os.path.join(here, m)) for m in re.findall(r'\]\(([^)#]+\.md)', row)}
        assert links and figures, row
        pages = ''
        for link in links:
            with open(link) as f:
                pages += f.read()
        missing = [x for x in figures if x not in pages]
        assert not missing, f'{path}: {missing} of {row!r} are on none of {sorted(links)}'
