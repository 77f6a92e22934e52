"""The Triton kernels compiled ahead of time for GPUs that need not be present: registers, spills, shared memory
and theoretical occupancy of every specialization the dispatcher (:mod:`dpp_surgery.native.triton_dpp`) can launch.

Triton compiles for an absent GPU (``triton.compile(ASTSource(...), target=GPUTarget('cuda', 90, 32))``) with the
``ptxas`` its wheel ships, and the wheel's ``cuobjdump --dump-resource-usage`` reads the cubin's registers, stack
(spill) bytes and shared memory. Nothing here needs a GPU, and it works whether or not ``TRITON_INTERPRET`` is set
(an interpreting Triton compiles nothing: worker processes without it do).

A specialization is what the launcher's constexprs fix: the kernel (forward, backward, gather for overlapping
windows' input gradient), the guide (Lite/Full), reward (sym/asym), normalisation, the activation dtype, the layout
(NCHW or channels_last: which stride is the unit stride the JIT specialises) and the window geometry (kernel and
stride; padding is a run-time argument), with the tile shape and warps :func:`triton_dpp.launch_config` picks at
GPU tile sizes (channels_last with at least 64 channels).

``python -m dpp_surgery.bench triton-report`` prints the table; tests/test_triton_compile.py checks it.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, Iterable, List, Optional, Sequence

__all__ = ['Spec', 'ARCHS', 'GEOMETRIES', 'all_specs', 'covering_specs', 'compile_spec', 'report', 'tools',
           'occupancy', 'format_table', 'TARGET_OCCUPANCY']

# Window geometries timm models get from convert: the 2x2/s2 that replaces strided convs and average pools, the
# ResNet stem's max pool 3x3/s2/p1 (overlapping: backward + gather) and 3x3/s3 (kernel = stride, non-overlapping)
GEOMETRIES = {'2x2s2': (2, 2, 2, 2), '3x3s2p1': (3, 3, 2, 2), '3x3s3': (3, 3, 3, 3)}
GUIDES = ('lite', 'full')
REWARDS = ('sym', 'asym')
NORMS = ('mean', 'none', 'sum')
DTYPES = ('float32', 'bfloat16', 'float16')  # what DPP2d hands the kernels on CUDA (autocast: bf16/fp16)
LAYOUTS = ('nchw', 'channels_last')
KERNELS = ('forward', 'backward', 'gather')
# the GPU's register file, warp and shared-memory limits per SM
ARCHS = {
    80: dict(regs=65536, max_warps=64, max_blocks=32, shared=164 * 1024, reg_unit=256),
    90: dict(regs=65536, max_warps=64, max_blocks=32, shared=228 * 1024, reg_unit=256),
}
RESERVED_SHARED = 1024  # shared memory the system reserves per block (sm_80 and later)
TARGET_OCCUPANCY = 0.25  # the forward of every specialization, and the backward of 2x2 windows
_TL_DTYPES = {'float32': 'fp32', 'bfloat16': 'bf16', 'float16': 'fp16'}
_ACTIVATION_POINTERS = ('x_ptr', 'g_ptr', 'o_ptr', 'go_ptr', 'gx_ptr', 'gg_ptr')
# per kernel: the stride arguments of each tensor, in (n, c, h, w) order
_STRIDES = {
    'forward': ('sx', 'sg', 'so'),
    'backward': ('sx', 'sg', 'sq', 'so', 'sd', 'ss'),
    'gather': ('sx', 'sd', 'ss'),
}


@dataclasses.dataclass(frozen=True)
class Spec:
    kernel: str
    guide: str
    reward: str
    norm: str
    dtype: str
    layout: str
    geometry: str

    @property
    def name(self) -> str:
        norm = '' if self.kernel == 'gather' else f'-{self.norm}'
        guide = '' if self.kernel == 'gather' else f'{self.guide}-'
        return f'{self.kernel} {guide}{self.reward}{norm} {self.geometry} {self.dtype} {self.layout}'

    @property
    def overlapping(self) -> bool:
        kh, kw, sh, sw = GEOMETRIES[self.geometry]
        return kh > sh or kw > sw


def all_specs(kernels: Sequence[str] = KERNELS, guides=GUIDES, rewards=REWARDS, norms=NORMS, dtypes=DTYPES,
              layouts=LAYOUTS, geometries=tuple(GEOMETRIES)) -> List[Spec]:
    """Every specialization of the product the dispatcher can launch (the gather kernel only for overlapping
    windows, and once per reward/dtype/layout/geometry: it does not depend on the guide or the norm)."""
    specs = []
    for kernel, guide, reward, norm, dtype, layout, geometry in itertools.product(
            kernels, guides, rewards, norms, dtypes, layouts, geometries):
        spec = Spec(kernel, guide, reward, norm, dtype, layout, geometry)
        if kernel == 'gather':
            if not spec.overlapping or guide != guides[0] or norm != norms[0]:
                continue
        specs.append(spec)
    return specs


def covering_specs() -> List[Spec]:
    """A few specializations that cover every factor, with the heaviest ones (Full guide, 3x3 windows, bfloat16
    channels_last) in every kernel."""
    specs = []
    for i, (kernel, geometry) in enumerate(itertools.product(('forward', 'backward'), GEOMETRIES)):
        for j, (dtype, layout) in enumerate((('bfloat16', 'channels_last'), ('float32', 'nchw'))):
            specs.append(Spec(kernel, GUIDES[(i + j) % 2] if j else 'full', REWARDS[(i + j) % 2], NORMS[(i + j) % 3],
                              dtype, layout, geometry))
    specs += [Spec('forward', 'lite', 'sym', 'mean', 'float16', 'channels_last', '2x2s2'),
              Spec('backward', 'full', 'asym', 'none', 'float16', 'nchw', '2x2s2'),
              Spec('gather', 'lite', 'sym', 'mean', 'bfloat16', 'channels_last', '3x3s2p1'),
              Spec('gather', 'lite', 'asym', 'mean', 'float32', 'nchw', '3x3s2p1')]
    return specs


def tools() -> Dict[str, Optional[str]]:
    """Paths of the ptxas and cuobjdump that Triton's wheel ships (None where missing) and why not."""
    try:
        import triton.backends.nvidia as nvidia
    except Exception as error:  # no Triton, or one without the NVIDIA backend
        return {'ptxas': None, 'cuobjdump': None, 'error': f'{type(error).__name__}: {error}'}
    found = {}
    for tool in ('ptxas', 'cuobjdump'):
        path = os.path.join(os.path.dirname(nvidia.__file__), 'bin', tool)
        found[tool] = path if os.access(path, os.X_OK) else shutil.which(tool)
    missing = [t for t, p in found.items() if p is None]
    found['error'] = f'{" and ".join(missing)} not found in Triton\'s wheel or on PATH' if missing else None
    return found


_POOL = {}


def _interpreted() -> bool:
    """Whether this process's Triton interprets (TRITON_INTERPRET was set when it was imported): its own jit
    functions (tl.zeros, ...) are then interpreted too, and compiling happens in a worker process without it."""
    if 'triton' not in sys.modules:
        return os.environ.get('TRITON_INTERPRET', '0') not in ('', '0')
    from triton import knobs
    return bool(knobs.runtime.interpret)


def _pool(jobs: int = 1):
    """Worker processes (spawned, TRITON_INTERPRET removed from their environment) that compile."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    if _POOL.get('jobs', 0) < jobs:
        if 'pool' in _POOL:
            _POOL['pool'].shutdown()
        saved = os.environ.pop('TRITON_INTERPRET', None)
        try:
            pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context('spawn'))
            pool.submit(int).result()  # (starts the workers now, with this environment)
        finally:
            if saved is not None:
                os.environ['TRITON_INTERPRET'] = saved
        _POOL.update(pool=pool, jobs=jobs)
    return _POOL['pool']


def _kernels_module():
    from . import triton_dpp
    assert not triton_dpp.INTERPRETED
    return triton_dpp


def _signature(fn, spec: Spec, constexprs: Dict[str, object]):
    unit = 3 if spec.layout == 'nchw' else 1  # the unit stride (w for NCHW, c for channels_last) the JIT specialises
    has_guide = spec.guide == 'full'
    for prefix in _STRIDES[spec.kernel]:
        if prefix in ('sg', 'sq') and not has_guide:
            continue  # (no guide: zero strides)
        constexprs[prefix + 'nchw'[unit]] = 1
    sig, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            sig[arg] = 'constexpr'
        elif arg.endswith('_ptr'):
            sig[arg] = '*' + (_TL_DTYPES[spec.dtype] if arg in _ACTIVATION_POINTERS else 'fp32')
            attrs[(i,)] = [['tt.divisibility', 16]]
        elif arg == 'eps':
            sig[arg] = 'fp32'
        else:
            sig[arg] = 'i32'
    return sig, attrs


def compile_spec(spec: Spec, arch: int = 90, channels: int = 256, config: Optional[dict] = None) -> dict:
    """Compile one specialization for sm_<arch> and read its resources: a dict with the spec's fields, arch,
    registers, stack, shared, block (positions, channels), warps, occupancy, blocks per SM and the limiting
    resource, compile seconds. ``config`` overrides the launch configuration (BLOCK_P, BLOCK_C, num_warps)."""
    if _interpreted():
        return _pool().submit(compile_spec, spec, arch, channels, config).result()
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .abi import NORM_CODES

    found = tools()
    if found['error']:
        raise RuntimeError(found['error'])
    module = _kernels_module()
    kh, kw, sh, sw = GEOMETRIES[spec.geometry]
    launch = dict(module.launch_config(spec.kernel, channels, spec.layout == 'channels_last', kh * kw, spec.norm))
    launch.update(config or {})
    constexprs = dict(KH=kh, KW=kw, SH=sh, SW=sw, ASYM=spec.reward == 'asym', ACC=tl.float32,
                      BLOCK_P=launch['BLOCK_P'], BLOCK_C=launch['BLOCK_C'])
    if spec.kernel == 'gather':
        fn = module.gather_kernel
        constexprs.update(NWH=-(-kh // sh), NWW=-(-kw // sw))
    else:
        fn = module.forward_kernel if spec.kernel == 'forward' else module.backward_kernel
        constexprs.update(NORM=NORM_CODES[spec.norm], HAS_GUIDE=spec.guide == 'full')
        if spec.kernel == 'backward':
            constexprs.update(NON_OVERLAP=not spec.overlapping)
    sig, attrs = _signature(fn, spec, constexprs)
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget('cuda', arch, 32),
                              options={'num_warps': launch['num_warps'], 'num_stages': 1})
    seconds = time.perf_counter() - start
    usage = _resource_usage(compiled.asm['cubin'], found['cuobjdump'])
    shared = max(int(compiled.metadata.shared), usage['SHARED'])
    row = dict(dataclasses.asdict(spec), name=spec.name, arch=f'sm_{arch}', registers=usage['REG'],
               stack=usage['STACK'] + usage['LOCAL'], shared=shared, block=[launch['BLOCK_P'], launch['BLOCK_C']],
               warps=launch['num_warps'], compile_s=round(seconds, 3))
    row.update(occupancy(usage['REG'], launch['num_warps'], shared, arch))
    return row


def _resource_usage(cubin: bytes, cuobjdump: str) -> Dict[str, int]:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, 'kernel.cubin')
        with open(path, 'wb') as f:
            f.write(cubin)
        text = subprocess.run([cuobjdump, '--dump-resource-usage', path], capture_output=True, text=True,
                              check=True, timeout=60).stdout
    line = next(line for line in text.splitlines() if 'REG:' in line)
    return {k: int(v) for k, v in re.findall(r'(\w+):(\d+)', line)}


def occupancy(registers: int, warps: int, shared: int, arch: int) -> dict:
    """Theoretical occupancy: resident warps per SM over the SM's maximum, with blocks limited by registers
    (allocated per warp in units of 256), shared memory, warps and blocks per SM."""
    a = ARCHS[arch]
    per_warp = -(-max(registers, 1) * 32 // a['reg_unit']) * a['reg_unit']
    limits = {'registers': (a['regs'] // per_warp) // warps, 'warps': a['max_warps'] // warps,
              'blocks': a['max_blocks']}
    if shared:
        limits['shared'] = a['shared'] // (shared + RESERVED_SHARED)
    blocks = min(limits.values())
    limiter = min(limits, key=lambda k: (limits[k], k == 'registers'))  # (a tie: the hardware cap)
    return {'occupancy': blocks * warps / a['max_warps'], 'blocks_per_sm': blocks, 'limiter': limiter}


def meets_targets(row: dict) -> List[str]:
    """What a compiled specialization misses of the targets: no spill anywhere; at least TARGET_OCCUPANCY for
    every forward and for the backward of 2x2 windows."""
    missed = []
    if row['stack'] > 0:
        missed.append(f'{row["name"]} {row["arch"]}: spills ({row["stack"]} stack bytes)')
    needs = row['kernel'] == 'forward' or (row['kernel'] == 'backward' and row['geometry'] == '2x2s2')
    if needs and row['occupancy'] < TARGET_OCCUPANCY - 1e-9:
        missed.append(f'{row["name"]} {row["arch"]}: occupancy {row["occupancy"]:.0%} < {TARGET_OCCUPANCY:.0%} '
                      f'({row["registers"]} registers, {row["warps"]} warps)')
    return missed


def report(specs: Optional[Iterable[Spec]] = None, archs: Sequence[int] = (90, 80), channels: int = 256,
           progress=None, jobs: int = 1) -> dict:
    """Compile each spec for each arch (in ``jobs`` worker processes):
    ``{'triton': version, 'rows': [...], 'missed': [...], 'seconds': s}``."""
    import triton
    specs = list(all_specs() if specs is None else specs)
    work = [(spec, arch) for arch in archs for spec in specs]
    rows, start = [], time.perf_counter()
    if jobs > 1 or _interpreted():
        futures = [_pool(jobs).submit(compile_spec, spec, arch, channels) for spec, arch in work]
        for future in futures:
            rows.append(future.result())
            if progress is not None:
                progress(rows[-1])
    else:
        for spec, arch in work:
            rows.append(compile_spec(spec, arch, channels))
            if progress is not None:
                progress(rows[-1])
    missed = [m for row in rows for m in meets_targets(row)]
    return {'triton': triton.__version__, 'python': sys.version.split()[0], 'channels': channels, 'rows': rows,
            'missed': missed, 'seconds': round(time.perf_counter() - start, 1)}


def format_table(rows: Sequence[dict]) -> str:
    lines = ['| kernel | arch | registers | stack B | shared B | block (P x C) | warps | occupancy | limited by |',
             '|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        lines.append(f'| {r["name"]} | {r["arch"]} | {r["registers"]} | {r["stack"]} | {r["shared"]} | '
                     f'{r["block"][0]} x {r["block"][1]} | {r["warps"]} | {r["occupancy"]:.0%} | {r["limiter"]} |')
    return '\n'.join(lines)


def _span(values: Sequence, fmt: str = '{}') -> str:
    lo, hi = min(values), max(values)
    return fmt.format(lo) if lo == hi else f'{fmt.format(lo)}-{fmt.format(hi)}'


def summary_table(rows: Sequence[dict]) -> str:
    """One line per kernel x window x arch of a :func:`report`: how many kernels, the ranges of their registers
    and theoretical occupancy, their tiles and warps, and the largest spill."""
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault((KERNELS.index(r['kernel']), list(GEOMETRIES).index(r['geometry']), r['arch']),
                          []).append(r)
    lines = ['| kernel | window | arch | kernels | registers | occupancy | tiles (P x C) | warps '
             '| most stack (spill) B |',
             '|---|---|---|---|---|---|---|---|---|']
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2] != 'sm_90', k[2])):
        g = groups[key]
        tiles = ', '.join(sorted({f'{r["block"][0]}x{r["block"][1]}' for r in g}, key=lambda t: -int(t.split('x')[0])))
        lines.append(f'| {KERNELS[key[0]]} | {list(GEOMETRIES)[key[1]]} | {key[2]} | {len(g)} | '
                     f'{_span([r["registers"] for r in g])} | '
                     f'{_span(sorted({round(100 * r["occupancy"]) for r in g}), "{}%")} | {tiles} | '
                     f'{_span([r["warps"] for r in g])} | {max(r["stack"] for r in g)} |')
    return '\n'.join(lines)
