"""The package's layering (docs/internals/index.md, "What lives where"): what ``import dpp_surgery`` loads and costs,
and which module may import which.

Layers, lowest first: utils, layers, surgery, export; models and training (they use each other, module by module);
tools (and the command entry points) on top. A module imports only from its own layer and the ones below, and never
another module's private names.
"""
import ast
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

import dpp_surgery

PACKAGE = Path(dpp_surgery.__file__).resolve().parent
# the command entry points: they run a tool (python -m dpp_surgery.bench, ...) and are part of the top layer
ENTRY_POINTS = {'bench', 'demo', 'experiments', 'zoo', 'zoo.__main__', '__main__', 'cli'}
RANK = {'version': 0, 'utils': 0, 'native': 0, 'layers': 1, 'surgery': 2, 'export': 3, 'models': 4, 'training': 4,
        'tools': 5, '__init__': 5}  # the package's facade (lazy names) is for the top layer


def _run(code: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(PACKAGE.parent))
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True, env=env,
                          timeout=300).stdout


def test_import_loads_neither_training_nor_onnx_and_registers_the_zoo():
    out = json.loads(_run('import sys, json, timm; before = set(sys.modules); import dpp_surgery; '
                          'print(json.dumps({"added": sorted(set(sys.modules) - before), "all": sorted(sys.modules), '
                          '"zoo": timm.is_model("efficientnet_lite0_dpp")}))'))
    # beyond what timm itself loads, only the package's own light modules
    added = [m for m in out['added'] if not m.startswith(('dpp_surgery.models', 'dpp_surgery.utils',
                                                          'dpp_surgery.version')) and m != 'dpp_surgery']
    assert added == []
    assert not [m for m in out['all'] if m.split('.')[0] in ('onnx', 'onnxruntime', 'onnxscript')]
    assert out['zoo']  # the recipes are timm models after the import
    # the public names load on first use, with their real signatures
    out = json.loads(_run('import sys, json, inspect, dpp_surgery; f = dpp_surgery.finetune; '
                          'print(json.dumps({"sig": str(inspect.signature(dpp_surgery.export_onnx)), '
                          '"training": "dpp_surgery.training.finetune" in sys.modules}))'))
    assert out['training'] and out['sig'].startswith('(model')
    with pytest.raises(AttributeError, match='no attribute'):
        dpp_surgery.no_such_name  # noqa: B018


def _import_seconds(module: str) -> float:
    return float(_run(f'import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)'))


def test_import_time_is_close_to_timms():
    """``import dpp_surgery`` (which imports timm) costs at most 1.3x ``import timm``: medians of interleaved fresh
    interpreters, so that a load change hits both alike."""
    timm_s, ours_s = [], []
    for _ in range(3):
        timm_s.append(_import_seconds('timm'))
        ours_s.append(_import_seconds('dpp_surgery'))
    ratio = statistics.median(ours_s) / statistics.median(timm_s)
    assert ratio <= 1.3, f'import dpp_surgery {statistics.median(ours_s):.2f} s, timm {statistics.median(timm_s):.2f} s'


def _modules():
    for path in sorted(PACKAGE.rglob('*.py')):
        rel = path.relative_to(PACKAGE).with_suffix('')
        yield '.'.join(rel.parts), path


def _imports(name: str, path: Path):
    """(imported module, imported names) of every import in the module, resolved to absolute names."""
    tree = ast.parse(path.read_text())
    package = '.'.join(['dpp_surgery'] + name.split('.')[:-1])  # a module's package, and a package's own
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split('.')
                base = base[:len(base) - node.level + 1]
                module = '.'.join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ''
            yield module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def _layer(module: str, own: str) -> str:
    parts = module.split('.')[1:] or ['__init__']
    top = parts[0]
    if '.'.join(parts) in ENTRY_POINTS or top in ENTRY_POINTS:
        return 'tools'
    return top if top in RANK else own


def test_layers_import_only_downwards_and_no_private_names():
    problems = []
    for name, path in _modules():
        own = _layer('dpp_surgery.' + name, 'tools')
        for module, names in _imports(name, path):
            if not module.startswith('dpp_surgery'):
                continue
            target = _layer(module, own)
            if RANK[target] > RANK[own] and own != '__init__':
                problems.append(f'{name} ({own}) imports {module} ({target})')
            if module != 'dpp_surgery.' + name.replace('.__init__', ''):
                private = [n for n in names if n.startswith('_') and not n.startswith('__')]
                if private:
                    problems.append(f'{name} imports private {private} from {module}')
    assert problems == []


def test_the_layering_check_sees_a_violation(tmp_path):
    """The check above can fail: a library module that imports a tool, or a private name, is reported."""
    path = tmp_path / 'bad.py'
    path.write_text('from ..tools.bench import main\nfrom ..surgery.plan import _secret\n')
    found = list(_imports('layers.bad', path))
    assert ('dpp_surgery.tools.bench', ['main']) in found and ('dpp_surgery.surgery.plan', ['_secret']) in found
    assert RANK[_layer('dpp_surgery.tools.bench', 'layers')] > RANK['layers']
