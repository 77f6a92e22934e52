"""The DPP2d custom-op library for any onnxruntime host (``build_ort_library``, ``dpp-surgery ort-library``): portable
(baseline x86-64-v2 with AVX2/AVX-512 chosen at run time), needing nothing beyond the C and C++ runtimes, and run
by plain onnxruntime in a process where neither torch nor dpp_surgery can be imported."""
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch

from dpp_surgery import convert, dpp_layers, export_onnx
from dpp_surgery.cli import main as cli_main
from dpp_surgery.export import build_ort_library
from dpp_surgery.native import ort_kernel
from dpp_surgery.native import elf_dependencies, find_compiler, newest_version

X86_64 = platform.machine() in ('x86_64', 'AMD64')
# what every Linux host has: the C library, libm, the C++ runtime, libgcc_s and the dynamic loader
ALLOWED_NEEDED = re.compile(r'(libc|libm|libstdc\+\+|libgcc_s)\.so\.\d+|ld-linux[\w.-]*\.so\.\d+')
# a child's first code: torch, dpp_surgery (and onnx, timm) cannot be imported there, only onnxruntime and numpy
_BLOCKER = '''
import sys
class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'dpp_surgery', 'onnx', 'timm', 'onnxscript'):
            raise ImportError(name + ' is blocked: this process may use onnxruntime and numpy only')
        return None
sys.meta_path.insert(0, _Blocker())
'''
# the host program: registers the library with plain onnxruntime and reports what it ran
_HOST = _BLOCKER + '''
import ctypes, glob, json, os
import numpy as np
import onnxruntime as ort
blocked = []
for name in ('torch', 'dpp_surgery'):
    try:
        __import__(name)
    except ImportError:
        blocked.append(name)
args = json.loads(sys.argv[1])
cases = np.load(args['cases'])
def session(path, library):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(args['tmp'], 'profile')
    if library:
        so.register_custom_ops_library(args['library'])
    return ort.InferenceSession(path, sess_options=so, providers=['CPUExecutionProvider'])
def errors(sess):
    out = []
    for i in range(len(cases.files) // 2):
        got = sess.run(None, {sess.get_inputs()[0].name: cases[f'x{i}']})[0]
        want = cases[f'y{i}']
        out.append(float(np.abs(got - want).max() / np.abs(want).max()) if got.shape == want.shape else 1e9)
    return out
def dpp_nodes_run(sess):
    with open(sess.end_profiling()) as f:
        events = json.load(f)
    return sum(1 for e in events if e.get('cat') == 'Node' and e['args'].get('op_name') == 'DPP2d')
sess = session(args['model'], True)
result = {'blocked': blocked, 'errors': errors(sess), 'dpp_nodes_run': dpp_nodes_run(sess)}
# the same file without its ONNX functions: only the library can run its DPP2d nodes
try:
    session(args['bare'], False)
    result['bare_without_library'] = 'ran'
except Exception as e:
    result['bare_without_library'] = str(e).splitlines()[0]
result['bare_errors'] = errors(session(args['bare'], True))
lib = ctypes.CDLL(args['library'])
lib.dpp_surgery_ort_isa.restype = ctypes.c_char_p
result['isa'] = lib.dpp_surgery_ort_isa().decode()
print(json.dumps(result))
'''


def _buildable() -> str:
    """Why the library cannot be built here ('' if it can): no compiler, or no onnxruntime headers to be had."""
    try:
        find_compiler()
        ort_kernel._headers()
    except RuntimeError as e:
        return str(e)
    return ''


@pytest.fixture(scope='module')
def library(tmp_path_factory):
    """The portable library, built (or taken from the cache) once for this module, in a folder of its own."""
    reason = _buildable()
    if reason:
        pytest.skip(f'the custom-op library cannot be built here: {reason}')
    return build_ort_library(str(tmp_path_factory.mktemp('ort_library')))


@pytest.fixture(scope='module')
def custom_case(tmp_path_factory):
    """A converted resnet18 (Full/asym DPP for its max pool, Lite elsewhere, parameters perturbed) in a custom-mode
    file, the same file stripped of its ONNX functions, and PyTorch's outputs for inputs of two sizes."""
    folder = tmp_path_factory.mktemp('custom_case')
    torch.manual_seed(0)
    model = timm.create_model('resnet18').eval()
    convert(model, input_size=(3, 64, 64), max_pool={'guide': 'full', 'reward': 'asym'})
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in dpp_layers(model):
            layer.theta_alpha.copy_(torch.randn(layer.theta_alpha.shape, generator=gen))
            layer.theta_lambda.copy_(torch.randn(layer.theta_lambda.shape, generator=gen) * 0.5)
    path = str(folder / 'r18_custom.onnx')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        export_onnx(model, path, mode='custom', example_input=torch.randn(1, 3, 64, 64))
    proto = onnx.load(path)
    assert proto.functions and any(n.op_type == 'DPP2d' for n in proto.graph.node)
    del proto.functions[:]
    bare = str(folder / 'r18_custom_bare.onnx')
    onnx.save(proto, bare)
    cases = {}
    for i, shape in enumerate([(2, 3, 64, 64), (1, 3, 67, 53)]):  # the file's spatial sizes are dynamic
        x = torch.randn(*shape)
        with torch.no_grad():
            cases[f'x{i}'], cases[f'y{i}'] = x.numpy(), model(x).numpy()
    np.savez(folder / 'cases.npz', **cases)
    return {'model': path, 'bare': bare, 'cases': str(folder / 'cases.npz'), 'tmp': str(folder),
            'dpp_layers': len(dpp_layers(model))}


def _host(case, library, **env) -> dict:
    """Run the host program in a fresh interpreter (outside the repository, without PYTHONPATH) on ``case``."""
    child_env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'DPP_SURGERY_ORT_ISA')}
    child_env.update(env)
    args = json.dumps({**{k: v for k, v in case.items() if k != 'dpp_layers'}, 'library': library})
    proc = subprocess.run([sys.executable, '-c', _HOST, args], capture_output=True, text=True, timeout=300,
                          cwd=case['tmp'], env=child_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_plain_onnxruntime_runs_the_file_with_the_library_alone(library, custom_case):
    out = _host(custom_case, library)
    assert out['blocked'] == ['torch', 'dpp_surgery']  # the host really had neither
    assert len(out['errors']) == 2 and max(out['errors']) <= 1e-4, out['errors']
    # the library's kernel ran every DPP2d node (else onnxruntime would have inlined the ONNX functions)
    assert out['dpp_nodes_run'] >= custom_case['dpp_layers']
    # without its functions the file needs the library: onnxruntime refuses it alone and runs it with the library
    assert out['bare_without_library'] != 'ran' and 'DPP2d' in out['bare_without_library']
    assert max(out['bare_errors']) <= 1e-4, out['bare_errors']
    if X86_64:  # the best path this CPU has (x86-64-v3: AVX2, FMA, BMI1/2, F16C, MOVBE, LZCNT)
        v3 = {'avx2', 'fma', 'bmi1', 'bmi2', 'f16c', 'movbe', 'abm'} <= _cpu_flags()
        assert out['isa'] in (('avx2', 'avx512') if v3 else ('x86-64-v2',)), out['isa']
        assert (out['isa'] == 'avx512') == ({'avx512f', 'avx512bw', 'avx512cd', 'avx512dq', 'avx512vl'} <= _cpu_flags())


def _cpu_flags() -> set:
    with open('/proc/cpuinfo') as f:
        return set(next(line for line in f if line.startswith('flags')).split(':', 1)[1].split())


@pytest.mark.skipif(not X86_64, reason='ISA dispatch is built on x86-64 only')
def test_baseline_path_gives_the_same_outputs(library, custom_case):
    """Capped at the x86-64-v2 baseline (what a CPU without AVX2 runs), the library still matches PyTorch."""
    out = _host(custom_case, library, DPP_SURGERY_ORT_ISA='x86-64-v2')
    assert out['isa'] == 'x86-64-v2'
    assert max(out['errors']) <= 1e-4 and max(out['bare_errors']) <= 1e-4, out
    assert out['dpp_nodes_run'] >= custom_case['dpp_layers']


def _manifest(library) -> dict:
    with open(os.path.join(os.path.dirname(library), ort_kernel.MANIFEST_NAME)) as f:
        return json.load(f)


def test_needs_only_the_c_and_cxx_runtimes(library):
    readelf = shutil.which('readelf')
    if readelf is None:
        pytest.skip('readelf (binutils) is not installed')
    out = subprocess.run([readelf, '-d', library], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r'\(NEEDED\)\s+Shared library: \[(.+?)\]', out)
    assert needed and all(ALLOWED_NEEDED.fullmatch(n) for n in needed), needed  # no libgomp, no libonnxruntime
    assert not any('gomp' in n or 'onnxruntime' in n for n in needed)
    m = _manifest(library)
    assert m['needed'] == needed == elf_dependencies(library)['needed']


def test_manifest_states_what_the_file_needs(library):
    objdump = shutil.which('objdump')
    if objdump is None:
        pytest.skip('objdump (binutils) is not installed')
    out = subprocess.run([objdump, '-T', library], capture_output=True, text=True, check=True).stdout
    glibc = newest_version(re.findall(r'\b(GLIBC_\d+(?:\.\d+)*)\b', out), 'GLIBC_')
    m = _manifest(library)
    assert glibc and m['min_glibc'] == glibc
    assert m['min_glibcxx'] == newest_version(re.findall(r'\b(GLIBCXX_\d+(?:\.\d+)*)\b', out), 'GLIBCXX_')
    # the C API version the code asks for, and the package version
    source = (ort_kernel._SOURCE).read_text()
    asked = int(re.search(r'constexpr uint32_t kApiVersion = (\d+);', source).group(1))
    assert m['ort_api_version'] == asked == ort_kernel.ORT_API_VERSION and m['min_onnxruntime'] == f'1.{asked}'
    from dpp_surgery import __version__
    assert m['dpp_surgery_version'] == __version__ and m['library'] == os.path.basename(library)
    assert m['portable'] and m['machine'] == platform.machine()
    if X86_64:
        assert m['isa_paths'] == ['x86-64-v2', 'avx2', 'avx512']
    # the exported entry point onnxruntime calls
    assert re.search(r'\sRegisterCustomOps\s*$', out, re.MULTILINE)


@pytest.mark.skipif(not X86_64, reason='ISA dispatch is built on x86-64 only')
def test_only_the_avx_paths_use_avx(library):
    """The baseline code (the wrapper, the dispatch, the standard library's functions, the x86-64-v2 kernel) has no
    AVX instruction; the AVX2 kernel has no AVX-512 register; the AVX-512 kernel uses them."""
    objdump = shutil.which('objdump')
    if objdump is None:
        pytest.skip('objdump (binutils) is not installed')
    out = subprocess.run([objdump, '-d', '-C', '--no-show-raw-insn', library], capture_output=True, text=True,
                         check=True).stdout
    function, avx_outside, zmm_in_avx2, zmm_in_avx512 = '', set(), set(), 0
    for line in out.splitlines():
        header = re.match(r'[0-9a-f]+ <(.*)>:$', line)
        if header:
            function = header.group(1)
            continue
        vex = re.match(r'\s*[0-9a-f]+:\s+v[a-z]', line) or re.search(r'%[yz]mm', line)
        if not vex:
            continue
        avx512 = re.search(r'\bdpp_isa_avx512::|_avx512\b', function)
        avx2 = re.search(r'\bdpp_isa_avx2::|_avx2\b', function)
        if not (avx512 or avx2):
            avx_outside.add(function)
        elif avx2 and '%zmm' in line:
            zmm_in_avx2.add(function)
        elif avx512 and '%zmm' in line:
            zmm_in_avx512 += 1
    assert not avx_outside and not zmm_in_avx2, (sorted(avx_outside)[:5], sorted(zmm_in_avx2)[:5])
    assert zmm_in_avx512 > 0


def test_refuses_to_overwrite_and_names_the_fix(library, tmp_path):
    existing = tmp_path / 'lib'
    existing.mkdir()
    (existing / ort_kernel.LIBRARY_NAME).write_bytes(b'mine')
    with pytest.raises(FileExistsError, match=r'libdpp_surgery_ort.so exists: pass overwrite=True'):
        build_ort_library(str(existing))
    assert (existing / ort_kernel.LIBRARY_NAME).read_bytes() == b'mine'  # untouched
    path = build_ort_library(str(existing), overwrite=True)
    assert Path(path).read_bytes() == Path(library).read_bytes()
    assert not [p for p in os.listdir(existing) if p.endswith('.tmp')]  # no temporary file left behind
    blocker = tmp_path / 'a_file'
    blocker.write_text('')
    with pytest.raises(PermissionError, match='cannot create the directory .*choose a directory you can write to'):
        build_ort_library(str(blocker / 'sub'))


def test_cli_writes_the_library_and_reports_it(library, tmp_path, capsys):
    out_dir = tmp_path / 'out'
    assert cli_main(['ort-library', '--output', str(out_dir)]) == 0
    text = capsys.readouterr().out
    m = _manifest(str(out_dir / ort_kernel.LIBRARY_NAME))
    assert f"glibc >= {m['min_glibc']}" in text and 'onnxruntime >= 1.17 (C API version 17)' in text
    assert 'register_custom_ops_library' in text and (out_dir / ort_kernel.LIBRARY_NAME).is_file()
    assert cli_main(['ort-library', '--output', str(out_dir)]) == 1  # exists: one line naming the fix
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith('dpp-surgery: error: ') and '--overwrite' in err[-1]


def test_missing_compiler_and_headers_are_clear(tmp_path, monkeypatch):
    compiler = shutil.which('g++') or shutil.which('c++') or shutil.which('clang++')
    monkeypatch.setenv('CXX', str(tmp_path / 'no-such-g++'))
    with pytest.raises(RuntimeError, match=r'CXX=.*no-such-g\+\+ is not found: install it, or set CXX'):
        build_ort_library(str(tmp_path / 'a'))
    monkeypatch.delenv('CXX')
    monkeypatch.setenv('PATH', str(tmp_path))  # neither a compiler nor npm
    with pytest.raises(RuntimeError, match=r'no C\+\+ compiler found: install g\+\+'):
        build_ort_library(str(tmp_path / 'b'))
    if compiler is None:
        return
    monkeypatch.setenv('CXX', compiler)  # a compiler, but no npm on PATH
    monkeypatch.delenv('ORT_INCLUDE_DIR', raising=False)
    monkeypatch.setenv('DPP_SURGERY_CACHE', str(tmp_path / 'cache'))  # no headers cached there
    with pytest.raises(RuntimeError, match=r'install npm .* or set ORT_INCLUDE_DIR'):
        build_ort_library(str(tmp_path / 'c'))
    assert not (tmp_path / 'c' / ort_kernel.LIBRARY_NAME).exists()


def test_old_onnxruntime_headers_and_runtime_are_refused(tmp_path, monkeypatch):
    try:
        find_compiler()
    except RuntimeError as e:
        pytest.skip(str(e))
    headers = tmp_path / 'include'
    headers.mkdir()
    (headers / 'onnxruntime_c_api.h').write_text('#define ORT_API_VERSION 16\n')
    monkeypatch.setenv('ORT_INCLUDE_DIR', str(headers))
    with pytest.raises(RuntimeError, match=r'C API version 16 .*needs version 17: set ORT_INCLUDE_DIR'):
        build_ort_library(str(tmp_path / 'out'))
    import onnxruntime
    monkeypatch.setattr(onnxruntime, '__version__', '1.16.3')
    with pytest.raises(RuntimeError, match=r'onnxruntime 1.16.3 is installed.*needs onnxruntime 1.17 or newer.*pip '
                                           r'install -U'):
        ort_kernel._check_installed_ort()
