"""The package's layering (docs/internals/index.md, "What lives where"): what ``import dpp_surgery`` loads and costs,
and which module may import which.

Parts, lowest first (:data:`RANK`): version and utils; native; layers; surgery; export and checkpoint; models;
training; timing; zoo; tools (and the command entry points) on top. A part imports only parts of a lower rank,
function-level imports included; the modules inside one part import each other one way (no cycle); and no module
imports or reads another module's private names. A deprecated path (a module that only points to where its code
moved, ``__moved_to__``) is outside the layering.
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
ENTRY_POINTS = {'bench', 'demo', 'experiments', 'zoo.__main__', '__main__', 'cli'}
RANK = {'version': 0, 'utils': 0, 'native': 1, 'layers': 2, 'surgery': 3, 'export': 4, 'checkpoint': 4, 'models': 5,
        'training': 6, 'timing': 7, 'zoo': 8,
        '__init__': 9,  # the package's facade: its lazy names and the zoo's registration
        'tools': 10}


def _run(code: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(PACKAGE.parent))
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True, env=env,
                          timeout=300).stdout


def test_import_loads_neither_training_nor_onnx_and_registers_the_zoo():
    out = json.loads(_run('import sys, json, timm; before = set(sys.modules); import dpp_surgery; '
                          'print(json.dumps({"added": sorted(set(sys.modules) - before), "all": sorted(sys.modules), '
                          '"zoo": timm.is_model("efficientnet_lite0_dpp")}))'))
    # beyond what timm itself loads, only the package's own light modules
    added = [m for m in out['added'] if not m.startswith(('dpp_surgery.zoo', 'dpp_surgery.models', 'dpp_surgery.utils',
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
    """(dotted name below the package, path) of every module, deprecated paths left out."""
    for path in sorted(PACKAGE.rglob('*.py')):
        rel = path.relative_to(PACKAGE).with_suffix('')
        if not _deprecated_path(path):
            yield '.'.join(rel.parts), path


def _is_module(dotted: str) -> bool:
    rel = Path(*dotted.split('.')[1:])
    return (PACKAGE / rel).with_suffix('.py').is_file() or (PACKAGE / rel / '__init__.py').is_file()


def _deprecated_path(path: Path) -> bool:
    """A module that only points to where its code moved (``__moved_to__ = ...`` at module level)."""
    tree = ast.parse(path.read_text())
    return any(isinstance(node, ast.Assign) and any(getattr(t, 'id', None) == '__moved_to__' for t in node.targets)
               for node in tree.body)


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


def _layering_problems(modules):
    """What breaks the layering among ``modules`` ((name, path) pairs): an import of a part of the same or a higher
    rank, or of another module's private name."""
    problems = []
    for name, path in modules:
        own = _layer('dpp_surgery.' + name, 'tools')
        for module, names in _imports(name, path):
            if not module.startswith('dpp_surgery'):
                continue
            # 'from pkg import submodule' imports the submodule
            for imported in [f'{module}.{n}' for n in names if _is_module(f'{module}.{n}')] or [module]:
                target = _layer(imported, own)
                if target != own and RANK[target] >= RANK[own]:
                    problems.append(f'{name} ({own}) imports {imported} ({target})')
            if module != 'dpp_surgery.' + name.replace('.__init__', ''):
                private = [n for n in names if n.startswith('_') and not n.startswith('__')]
                if private:
                    problems.append(f'{name} imports private {private} from {module}')
    return problems


def test_parts_import_only_lower_parts_and_no_private_names():
    assert _layering_problems(list(_modules())) == []


def _documented_ranks():
    """The rank of each part as docs/internals/index.md's "What lives where" table states it."""
    import re

    text = (PACKAGE.parent / 'docs' / 'internals' / 'index.md').read_text()
    table = text.split('## What lives where', 1)[1].split('\n\n| rank | part | what |', 1)[1].split('\n\n', 1)[0]
    ranks = {}
    for row in table.strip().splitlines()[1:]:
        rank, part = row.split('|')[1:3]
        for name in re.findall(r'`([^`]+)`', part):
            name = name.removeprefix('dpp_surgery/').rstrip('/').removesuffix('.py')
            ranks[name] = int(rank)
    return ranks


def test_the_documented_layering_is_what_the_check_uses():
    ranks = _documented_ranks()
    assert {name: rank for name, rank in ranks.items() if name not in ENTRY_POINTS} == RANK
    assert all(ranks[name] == RANK['tools'] for name in ENTRY_POINTS & set(ranks))


def _module_edges(modules):
    """module -> the modules of its own part it imports (``from pkg import name`` counts as ``pkg.name`` where that is
    a module)."""
    names = {name.replace('.__init__', '') for name, _ in modules}
    edges = {}
    for name, path in modules:
        own, mine = _layer('dpp_surgery.' + name, 'tools'), name.replace('.__init__', '')
        for module, imported in _imports(name, path):
            if not module.startswith('dpp_surgery.'):
                continue
            base = module[len('dpp_surgery.'):]
            for target in [f'{base}.{n}' for n in imported if f'{base}.{n}' in names] or [base]:
                if target in names and target != mine and _layer('dpp_surgery.' + target, 'tools') == own:
                    edges.setdefault(mine, set()).add(target)
    return edges


def _cycles(edges):
    """Every module that can reach itself through ``edges``."""
    def reaches(start, goal, seen):
        for nxt in edges.get(start, ()):
            if nxt == goal or (nxt not in seen and (seen.add(nxt) or reaches(nxt, goal, seen))):
                return True
        return False
    return sorted(m for m in edges if reaches(m, m, set()))


def test_modules_of_one_part_import_each_other_one_way():
    assert _cycles(_module_edges(list(_modules()))) == []


def test_the_layering_check_sees_a_violation(tmp_path):
    """The check above can fail: a library module that imports a tool, or a private name, is reported."""
    path = tmp_path / 'bad.py'
    path.write_text('from ..tools.bench import main\nfrom ..surgery.plan import _secret\n')
    found = list(_imports('layers.bad', path))
    assert ('dpp_surgery.tools.bench', ['main']) in found and ('dpp_surgery.surgery.plan', ['_secret']) in found
    problems = _layering_problems([('layers.bad', path)])
    assert len(problems) == 3 and 'imports dpp_surgery.tools.bench (tools)' in problems[0] and '_secret' in problems[2]
    # a part of the same rank is refused too (export and checkpoint share one), and so is a cycle inside a part
    same = tmp_path / 'same.py'
    same.write_text('def f():\n    from ..checkpoint import save\n')
    assert _layering_problems([('export.same', same)]) == ['export.same (export) imports dpp_surgery.checkpoint '
                                                           '(checkpoint)']
    a, b = tmp_path / 'a.py', tmp_path / 'b.py'
    a.write_text('from . import b\n')
    b.write_text('def g():\n    from .a import x\n')
    assert _cycles(_module_edges([('tools.a', a), ('tools.b', b)])) == ['tools.a', 'tools.b']
    # a deprecated path is left out of the layering
    moved = tmp_path / 'moved.py'
    moved.write_text("import importlib\n__moved_to__ = 'dpp_surgery.zoo.registry'\n")
    assert _deprecated_path(moved) and not _deprecated_path(a)


def _private_definitions(trees):
    """private name -> the modules that define it (a def or class, an assignment, an attribute set, a setattr)."""
    defined = {}
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                found = node.name
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                found = node.attr
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                found = node.id
            elif isinstance(node, ast.Call) and getattr(node.func, 'id', None) == 'setattr' and len(node.args) > 1 \
                    and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
                found = node.args[1].value
            else:
                continue
            if found.startswith('_') and not found.startswith('__'):
                defined.setdefault(found, set()).add(name)
    return defined


def _private_attribute_reads(trees):
    """(module, line, name, defining modules) of every ``x._name`` read in a module where ``_name`` is a private name
    that other modules of the package define and this one does not; torch's own (``_modules``, ``_forward_hooks``,
    ...) are not the package's."""
    import torch

    theirs = set(dir(torch.nn.Module())) | set(dir(torch.Tensor))
    defined = _private_definitions(trees)
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and node.attr in defined \
                    and name not in defined[node.attr] and node.attr not in theirs:
                yield name, node.lineno, node.attr, sorted(defined[node.attr])


def test_no_module_reads_another_modules_private_attributes():
    """Beyond imports: no ``module._helper`` or ``obj._field`` that only another module of the package defines."""
    trees = {name: ast.parse(path.read_text()) for name, path in _modules()}
    problems = [f'{name}:{line} reads .{attr}, private to {owners}'
                for name, line, attr, owners in _private_attribute_reads(trees)]
    assert problems == []


def test_the_private_attribute_check_sees_a_violation():
    trees = {'layers.a': ast.parse('def _helper():\n    pass\n\nclass A:\n    def f(self):\n        self._state = 1\n'),
             'surgery.b': ast.parse('from ..layers import a\n\ndef g(obj):\n    return a._helper(), obj._state, '
                                    'obj._modules\n')}
    found = {(name, attr) for name, _, attr, _ in _private_attribute_reads(trees)}
    assert found == {('surgery.b', '_helper'), ('surgery.b', '_state')}


def _private_timm_imports(trees):
    """(module, line, imported) for every import of a private timm module (``timm.models._builder`` and the like):
    the package uses timm through its public names only, so a timm release that moves its internals breaks nothing."""
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                paths = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                paths = [node.module] + [f'{node.module}.{a.name}' for a in node.names]
            else:
                continue
            for path in paths:
                parts = path.split('.')
                if parts[0] == 'timm' and any(p.startswith('_') for p in parts[1:]):
                    yield name, node.lineno, path
                    break


def test_timm_is_used_through_its_public_names_only():
    trees = {name: ast.parse(path.read_text()) for name, path in _modules()}
    assert list(_private_timm_imports(trees)) == []
    sample = {'zoo.a': ast.parse('import timm\nfrom timm.models import FeatureListNet\n'
                                 'from timm.models import _builder\n'
                                 'def f():\n    from timm.models._features import FeatureGetterNet\n')}
    assert [(line, path) for _, line, path in _private_timm_imports(sample)] == [
        (3, 'timm.models._builder'), (5, 'timm.models._features')]


MAX_FUNCTION_LINES = 80


def _long_functions(trees):
    """(module, function, lines) for every function or method longer than MAX_FUNCTION_LINES, docstring included."""
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    yield name, node.name, lines


def test_no_function_in_the_library_is_longer_than_80_lines():
    """A function that does not fit a screen holds more than one idea: split it."""
    trees = {name: ast.parse(path.read_text()) for name, path in _modules()}
    assert list(_long_functions(trees)) == []


def test_the_function_length_check_sees_a_violation():
    body = ''.join(f'        x{i} = {i}\n' for i in range(MAX_FUNCTION_LINES))
    trees = {'layers.a': ast.parse(f'def short():\n    pass\n\nclass A:\n    def long(self):\n{body}')}
    assert list(_long_functions(trees)) == [('layers.a', 'long', MAX_FUNCTION_LINES + 1)]


MOVED = {'dpp_surgery.layers.kernel': 'dpp_surgery.native.kernel',
         'dpp_surgery.layers.triton_dpp': 'dpp_surgery.native.triton_dpp',
         'dpp_surgery.layers.triton_aot': 'dpp_surgery.native.triton_aot',
         'dpp_surgery.export.ort_kernel': 'dpp_surgery.native.ort_kernel',
         'dpp_surgery.training.checkpoint': 'dpp_surgery.checkpoint',
         'dpp_surgery.models.registry': 'dpp_surgery.zoo.registry',
         'dpp_surgery.tools.zoo': 'dpp_surgery.zoo.runner',
         'dpp_surgery.tools.timing': 'dpp_surgery.timing'}


def test_moved_modules_still_import_from_their_old_paths_with_a_deprecation_warning():
    """Each old path gives the new module itself (its names, private ones too) and warns once; the zoo's names read
    from dpp_surgery.models warn too. In a fresh process: an imported module does not warn again."""
    code = ('import importlib, json, warnings\n'
            'out = {}\n'
            f'for old, new in {MOVED!r}.items():\n'
            '    with warnings.catch_warnings(record=True) as w:\n'
            '        warnings.simplefilter("always")\n'
            '        mod = importlib.import_module(old)\n'
            '    out[old] = [mod is importlib.import_module(new), [str(x.message) for x in w '
            'if x.category is DeprecationWarning]]\n'
            'import dpp_surgery.models, dpp_surgery.zoo\n'
            'with warnings.catch_warnings(record=True) as w:\n'
            '    warnings.simplefilter("always")\n'
            '    same = dpp_surgery.models.get_recipe is dpp_surgery.zoo.get_recipe\n'
            'out["models.get_recipe"] = [same, [str(x.message) for x in w]]\n'
            'print(json.dumps(out))\n')
    out = json.loads(_run(code))
    for old, new in MOVED.items():
        same, messages = out[old]
        assert same and len(messages) == 1 and f'{old} moved to {new}' in messages[0], (old, messages)
    same, messages = out['models.get_recipe']
    assert same and messages == ['dpp_surgery.models.get_recipe moved to dpp_surgery.zoo.get_recipe; import it from '
                                 'there (the old path goes in the next release)']
