"""The GPU check: ``python -m dpp_surgery.tools.gpu_check --output DIR`` (``make gpu-check PYTHON=...``).

For a machine that already has torch and Triton (and, for some sections, timm): installs nothing, runs from the
source tree with the machine's own python, and finishes within about 8 minutes on one H100. Sections, each timed,
each skipped with its reason where a package, a compiler or the device is missing:

* versions: python, torch, Triton, timm, the GPU;
* parity: the compiled Triton kernels against the float64 reference (the PyTorch path in float64) and the PyTorch
  path in the same dtype, at realistic sizes (96 channels, NCHW and channels_last, many position and channel
  tiles), float32 and bfloat16, every guide x reward x norm and the 2x2/s2, 3x3/s2/p1 and 3x3/s3 windows; values
  and the gradients of input, alpha, lambda and the guide filter;
* compile: ``torch.compile`` of a converted timm resnet18 with ``torch._dynamo.explain``: no graph break;
* autocast: a bfloat16 autocast training step of the converted model (channels_last), finite loss, DPP moves;
* determinism: two backward passes give bitwise identical gradients;
* bench: ``bench layer --device cuda`` and ``bench train --device cuda`` with small settings;
* triton-report: registers, spills and occupancy of the kernels compiled for sm_90 and sm_80.

Everything goes to DIR: ``gpu_check.log`` (what was printed) and ``gpu_check.json`` (sections, times, results), plus
the benchmarks' and the report's JSON. ``--dry`` runs the same script on a CPU: Triton's interpreter
(TRITON_INTERPRET=1), CPU tensors, tiny shapes, torch.compile with the aot_eager backend (tests/test_gpu_check.py).
The exit status is 1 if a section failed.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
import traceback
import warnings
from typing import Dict, List, Optional

BUDGET_S = 480  # sections that would start after this many seconds are skipped


class Skip(Exception):
    """A section that cannot run here, and why."""


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
            s.flush()
        return len(text)

    def flush(self):
        for s in self.streams:
            s.flush()


def _filters() -> None:
    """The script's own warning filters: third-party deprecation and experimental-feature notices are noise here;
    everything else is shown once."""
    warnings.resetwarnings()
    warnings.simplefilter('default')
    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.filterwarnings('ignore', category=category)
    warnings.filterwarnings('ignore', message='.*TF32.*')
    warnings.filterwarnings('ignore', module='torch._dynamo.*')
    warnings.filterwarnings('ignore', module='torch._inductor.*')


def _need(module: str):
    import importlib
    try:
        return importlib.import_module(module)
    except Exception as error:  # missing, or broken on this machine
        raise Skip(f'{module} is not importable ({type(error).__name__}: {error})')


class Check:
    def __init__(self, dry: bool, output: str):
        import torch
        self.dry = dry
        self.output = output
        self.device = 'cpu' if dry else 'cuda'
        self.torch = torch
        self.start = time.perf_counter()

    # ---- sections

    def versions(self) -> dict:
        import torch
        info = {'python': platform.python_version(), 'torch': torch.__version__,
                'cuda': torch.version.cuda, 'dry': self.dry}
        for name in ('triton', 'timm', 'onnx', 'onnxruntime'):
            try:
                info[name] = __import__(name).__version__
            except Exception as error:
                info[name] = f'missing ({type(error).__name__})'
        info['gpu'] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        from dpp_surgery import kernel_status
        info['triton_kernels'] = kernel_status()['triton']
        for k, v in info.items():
            print(f'  {k}: {v}')
        if not self.dry and not torch.cuda.is_available():
            raise RuntimeError('no CUDA device: run with --dry on a CPU')
        return info

    def _variants(self):
        guides, rewards, norms = ('lite', 'full'), ('sym', 'asym'), ('mean', 'none', 'sum')
        return [(g, r, n) for g in guides for r in rewards for n in norms]

    def parity(self) -> dict:
        import torch

        from dpp_surgery import dpp2d
        if self.dry:
            shape, dtypes, geometries = (2, 5, 7, 9), (torch.float32,), {'2x2s2': (2, 2, 0), '3x3s2p1': (3, 2, 1)}
            variants = [('lite', 'sym', 'mean'), ('full', 'asym', 'sum')]
        else:
            shape, dtypes = (4, 96, 30, 30), (torch.float32, torch.bfloat16)
            geometries = {'2x2s2': (2, 2, 0), '3x3s2p1': (3, 2, 1), '3x3s3': (3, 3, 0)}
            variants = self._variants()
        # relative to the largest reference value: output, gradients
        tolerance = {torch.float32: (2e-5, 2e-4), torch.bfloat16: (3e-2, 1.5e-1)}
        gen = torch.Generator().manual_seed(0)
        rows, failures = [], []
        for i, (guide, reward, norm) in enumerate(variants):
            # every variant, dtype and layout; the geometry turns with the variant (each geometry, each guide)
            names = list(geometries)
            for gname in [names[i % len(names)]]:
                k, s, p = geometries[gname]
                c = shape[1]
                ta = 0.5 * torch.randn(c, generator=gen)
                tl = 0.5 * torch.randn(c, generator=gen)
                kg = k + 1 if k % 2 == 0 else k
                gw = (1.0 / kg ** 2 + 0.1 * torch.randn(c, 1, kg, kg, generator=gen)) if guide == 'full' else None
                base = torch.randn(shape, generator=gen)
                for dtype in dtypes:
                    x = base.to(dtype)
                    grad_out = None
                    ref = None
                    for layout in ('nchw', 'channels_last'):
                        fmt = torch.channels_last if layout == 'channels_last' else torch.contiguous_format
                        results = {}
                        for impl, run_dtype in (('f64', torch.float64), ('torch', dtype), ('triton', dtype)):
                            if impl == 'f64' and ref is not None:
                                results[impl] = ref
                                continue
                            leaves = [t.to(self.device, run_dtype if t is x else
                                           (torch.float64 if impl == 'f64' else torch.float32)).detach().clone()
                                      .requires_grad_(True) for t in (x, ta, tl) + ((gw,) if gw is not None else ())]
                            leaves[0] = leaves[0].detach().contiguous(memory_format=fmt).requires_grad_(True)
                            out = dpp2d(leaves[0], leaves[1], leaves[2], k, s, p,
                                        guide_weight=leaves[3] if gw is not None else None, reward=reward, norm=norm,
                                        impl='torch' if impl != 'triton' else 'triton')
                            if grad_out is None:
                                grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
                            out.backward(grad_out.to(self.device, out.dtype))
                            results[impl] = [out.detach().double().cpu()] + [t.grad.double().cpu() for t in leaves]
                        ref = results['f64']
                        out_tol, grad_tol = tolerance[dtype]
                        row = {'variant': f'{guide}-{reward}-{norm}', 'geometry': gname, 'dtype': str(dtype)[6:],
                               'layout': layout}
                        for against in ('f64', 'torch'):
                            errs = []
                            for i, (got, want) in enumerate(zip(results['triton'], results[against])):
                                scale = max(want.abs().max().item(), 1e-3)
                                errs.append((got - want).abs().max().item() / scale)
                            row[f'err_vs_{against}'] = max(errs)
                            tol = max(out_tol, grad_tol) * (1 if against == 'f64' else 2)
                            ok = (errs[0] <= out_tol * (1 if against == 'f64' else 2)
                                  and all(e <= tol for e in errs[1:]))
                            if not ok or not all(torch.isfinite(t).all() for t in results['triton']):
                                failures.append(f"{row['variant']} {gname} {row['dtype']} {layout} vs {against}: "
                                                f"relative errors {[f'{e:.2g}' for e in errs]}")
                        rows.append(row)
        worst = {d: max(r['err_vs_f64'] for r in rows if r['dtype'] == d) for d in {r['dtype'] for r in rows}}
        print(f'  {len(rows)} cases (shape {shape}); worst relative error against float64 per dtype: '
              + ', '.join(f'{d} {e:.2g}' for d, e in sorted(worst.items())))
        for f in failures:
            print(f'  FAIL {f}')
        if failures:
            raise AssertionError(f'{len(failures)} parity failures')
        return {'cases': len(rows), 'shape': list(shape), 'worst': worst, 'rows': rows}

    def _converted(self, size: int):
        import torch
        timm = _need('timm')
        from dpp_surgery import convert, dpp_layers
        torch.manual_seed(0)
        model = timm.create_model('resnet18', num_classes=10)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            convert(model, input_size=(3, size, size))
        assert dpp_layers(model), 'convert placed no DPP layer'
        # (--dry: DPP2d's 'auto' runs the CPU kernel, one custom op like the Triton kernels on the GPU)
        return model.to(self.device)

    def compile(self) -> dict:
        import torch
        size, batch = (32, 2) if self.dry else (64, 8)
        model = self._converted(size).eval()
        x = torch.randn(batch, 3, size, size, device=self.device)
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(model)(x)
        breaks = [str(b.reason) if hasattr(b, 'reason') else str(b) for b in explanation.break_reasons]
        print(f'  torch._dynamo.explain: {explanation.graph_count} graph(s), {explanation.graph_break_count} break(s)')
        for b in breaks:
            print(f'    break: {b[:300]}')
        backend = 'aot_eager' if self.dry else 'inductor'
        torch._dynamo.reset()
        with torch.no_grad():
            eager = model(x)
            compiled = torch.compile(model, backend=backend)(x)
        err = (compiled.float() - eager.float()).abs().max().item() / max(eager.abs().max().item(), 1e-6)
        print(f'  torch.compile(backend={backend!r}) against eager: relative error {err:.2g}')
        assert explanation.graph_break_count == 0, f'graph breaks: {breaks}'
        assert err < 1e-3, err
        return {'graphs': explanation.graph_count, 'breaks': explanation.graph_break_count, 'backend': backend,
                'rel_err': err}

    def autocast(self) -> dict:
        import torch
        import torch.nn.functional as F

        from dpp_surgery import dpp_layers
        size, batch = (32, 2) if self.dry else (64, 32)
        model = self._converted(size).train().to(memory_format=torch.channels_last)
        layer = dpp_layers(model)[0][1]
        seen = {}
        layer.register_forward_hook(lambda m, args, out: seen.update(inp=str(args[0].dtype), out=str(out.dtype)))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        before = layer.theta_lambda.detach().clone()
        x = torch.randn(batch, 3, size, size, device=self.device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (batch,), device=self.device)
        losses = []
        for _ in range(1 if self.dry else 3):
            with torch.autocast(self.device, dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        print(f'  bfloat16 autocast steps: losses {[round(v, 4) for v in losses]}, DPP saw {seen}')
        assert all(map(lambda v: v == v and abs(v) != float('inf'), losses)), losses
        assert seen == {'inp': 'torch.bfloat16', 'out': 'torch.bfloat16'}, seen
        assert not torch.equal(layer.theta_lambda.detach(), before), 'DPP parameters did not move'
        return {'losses': losses, 'dpp_dtypes': seen}

    def determinism(self) -> dict:
        import torch

        from dpp_surgery import DPP2d
        shape = (1, 3, 6, 6) if self.dry else (8, 128, 56, 56)
        checked = 0
        formats = (torch.contiguous_format, torch.channels_last)
        for guide in ('lite', 'full'):
            for j, (k, s, p) in enumerate(((2, 2, 0), (3, 2, 1))):
                layer = DPP2d(shape[1], k, s, p, guide=guide, impl='triton').to(self.device)
                for dtype in (torch.float32,) if self.dry else (torch.float32, torch.bfloat16):
                    for fmt in formats[j:j + 1] if self.dry else formats:
                        x = torch.randn(shape, device=self.device, dtype=dtype).contiguous(memory_format=fmt)
                        grads = []
                        for _ in range(2):
                            xi = x.detach().requires_grad_(True)
                            layer.zero_grad()
                            out = layer(xi)
                            out.backward(torch.ones_like(out))
                            grads.append([xi.grad] + [q.grad.clone() for q in layer.parameters()])
                        for a, b in zip(*grads):
                            assert torch.equal(a, b), f'{guide} {k}x{k}/s{s} {dtype} {fmt}: gradients differ'
                        checked += 1
        print(f'  {checked} layer configurations: bitwise identical gradients over two backward passes')
        return {'configurations': checked, 'shape': list(shape)}

    def bench(self) -> dict:
        from dpp_surgery.tools import bench
        out = {}
        layer = os.path.join(self.output, 'bench_layer.json')
        argv = ['--record', layer, '--overwrite', 'layer', '--device', self.device,
                '--repeat', '2' if self.dry else '5',
                '--shape', *(('2', '8', '8', '8') if self.dry else ('16', '128', '56', '56')), '--no-memory']
        if self.dry:
            argv += ['--inner', '1', '--no-compile']
        else:
            argv += ['--inner', '3']
        assert bench.main(argv) == 0
        out['layer'] = layer
        if self.dry:
            print('  bench train: skipped in --dry (CPU training steps take minutes on 2 cores)')
            return out
        _need('timm')
        train = os.path.join(self.output, 'bench_train.json')
        assert bench.main(['--record', train, '--overwrite', 'train', '--device', 'cuda', '--models', 'resnet18',
                           '--img-size', '64', '-b', '32', '--repeat', '3', '--amp-dtype', 'bfloat16',
                           '--channels-last']) == 0
        out['train'] = train
        return out

    def triton_report(self) -> dict:
        from dpp_surgery.native import triton_aot
        found = triton_aot.tools()
        if found['error']:
            raise Skip(found['error'])
        if self.dry:
            specs, archs, jobs = [s for s in triton_aot.covering_specs() if s.geometry == '2x2s2'][:2], (90,), 1
        else:
            specs = triton_aot.all_specs(norms=('mean',), dtypes=('float32', 'bfloat16'))
            archs, jobs = (90, 80), max(1, min(8, (os.cpu_count() or 2) // 2))
        result = triton_aot.report(specs, archs=archs, jobs=jobs)
        print(triton_aot.format_table(result['rows']))
        for m in result['missed']:
            print(f'  missed: {m}')
        with open(os.path.join(self.output, 'triton_report.json'), 'w') as f:
            json.dump(result, f, indent=1)
        return {'kernels': len(result['rows']), 'missed': result['missed'], 'triton': result['triton'],
                'max_registers': max(r['registers'] for r in result['rows']),
                'min_occupancy': min(r['occupancy'] for r in result['rows'])}

    SECTIONS = ('versions', 'parity', 'compile', 'autocast', 'determinism', 'bench', 'triton_report')

    def run(self, only: Optional[List[str]] = None) -> Dict[str, dict]:
        results = {}
        for name in self.SECTIONS:
            if only and name not in only and name != 'versions':
                continue
            elapsed = time.perf_counter() - self.start
            print(f'\n== {name} ({elapsed:.0f} s in)', flush=True)
            if elapsed > BUDGET_S and not self.dry:
                results[name] = {'status': 'skipped', 'reason': f'time budget of {BUDGET_S} s spent'}
                print(f'  skipped: {results[name]["reason"]}')
                continue
            t0 = time.perf_counter()
            try:
                value = getattr(self, name)()
                entry = {'status': 'ok', 'result': value}
            except Skip as why:
                entry = {'status': 'skipped', 'reason': str(why)}
                print(f'  skipped: {why}')
            except Exception as error:  # one failed section does not stop the others
                entry = {'status': 'failed', 'error': f'{type(error).__name__}: {error}'}
                print(f'  FAILED: {type(error).__name__}: {error}')
                traceback.print_exc(file=sys.stdout)
            entry['seconds'] = round(time.perf_counter() - t0, 2)
            print(f'  [{name}: {entry["status"]}, {entry["seconds"]} s]', flush=True)
            results[name] = entry
        return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m dpp_surgery.tools.gpu_check', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--output', default='gpu_check_out', help='folder for the log and JSON (default gpu_check_out)')
    parser.add_argument('--dry', action='store_true',
                        help="CPU dry run: Triton's interpreter, tiny shapes, torch.compile with aot_eager")
    parser.add_argument('--sections', nargs='+', choices=Check.SECTIONS, help='only these sections')
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.dry and os.environ.get('TRITON_INTERPRET') != '1':
        # Triton reads TRITON_INTERPRET when it and the kernels are defined, and importing dpp_surgery may have
        # imported it already: run again in a process that has it from the start
        import subprocess
        argv = sys.argv[1:] if argv is None else list(argv)
        env = dict(os.environ, TRITON_INTERPRET='1')
        return subprocess.call([sys.executable, '-m', 'dpp_surgery.tools.gpu_check', *argv], env=env)
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    os.makedirs(args.output, exist_ok=True)
    log = open(os.path.join(args.output, 'gpu_check.log'), 'w')
    stdout = sys.stdout
    sys.stdout = _Tee(stdout, log)
    try:
        _filters()
        start = time.perf_counter()
        print(f'GPU check ({"dry run on the CPU" if args.dry else "CUDA"}), output in {args.output}')
        check = Check(args.dry, args.output)
        results = check.run(args.sections)
        total = round(time.perf_counter() - start, 1)
        failed = [n for n, r in results.items() if r['status'] == 'failed']
        print(f'\nGPU check: {len(results)} sections in {total} s; '
              + ', '.join(f'{n} {r["status"]} ({r.get("seconds", 0)} s)' for n, r in results.items()))
        with open(os.path.join(args.output, 'gpu_check.json'), 'w') as f:
            json.dump({'dry': args.dry, 'seconds': total, 'failed': failed, 'sections': results}, f, indent=1,
                      default=str)
        return 1 if failed else 0
    finally:
        sys.stdout = stdout
        log.close()


if __name__ == '__main__':
    sys.exit(main())
