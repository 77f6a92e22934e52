"""``bench onnx``, ``bench onnx-layer`` and ``bench runtimes``: DPP in onnxruntime, OpenVINO and tract.

Each benchmark measures into a record (``bench_onnx``, ``bench_onnx_layer``, ``bench_runtimes``, their targets
computed there by ``*_checks``) and writes its Markdown from the record alone (``render_onnx``,
``render_onnx_layer``, ``render_runtimes``, the tables by ``_*_table``): see :mod:`dpp_surgery.tools.bench.common`.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Dict, List, Tuple

os.environ.setdefault('KINETO_LOG_LEVEL', '5')  # keep the profiler's start/stop chatter out of the tables

import torch

from ...layers import DPP2d
from ...timing import interleaved_medians, machine_description
from .common import check, checks_text, note_ort_kernel

ONNX_MODELS = ('resnet18', 'resnet50', 'efficientnet_lite0')


DPP_SHARE_TARGET = 0.15  # at most this share of converted resnet50's onnxruntime time in DPP nodes


DECOMPOSED_OVER_CUSTOM_TARGET = 1.2  # decomposed file's onnxruntime latency / the custom file's (native kernel)


NODES_PER_LAYER_TARGET = 25  # ONNX nodes per DPP layer whose windows tile the input, decomposed


EXPORT_TIME_TARGET = 1.5  # converted model's export time / the unconverted model's, either mode


PORTABLE_OVER_NATIVE_TARGET = 1.10  # the portable onnxruntime library's DPP2d time / the -march=native build's


ERROR_TARGET = 1e-4  # max |runtime - PyTorch| / max |PyTorch| (the checks' text says 1e-4)


def _markdown(*parts: str) -> str:
    """The non-empty parts, one paragraph (or table) each."""
    return '\n\n'.join(p for p in parts if p)


def _table(header: List[str], lines: List[str]) -> str:
    """A Markdown table of ``header``'s columns and the rows ``lines`` (each ``| ... |``)."""
    return '\n'.join(['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header), *lines])


def _targets(checks: List[dict]) -> str:
    return 'Targets:\n\n' + checks_text(checks) if checks else ''


# ---------------------------------------------------------------------------------------------------- bench onnx


def _ort_node_times(session, feed: Dict, runs: int) -> List[Tuple[str, str, float]]:
    """(node name, op type, microseconds) of every node run in ``runs`` runs, from onnxruntime's profiler."""
    for _ in range(runs):
        session.run(None, feed)
    path = session.end_profiling()
    try:
        with open(path) as f:
            events = json.load(f)
    finally:
        os.unlink(path)
    return [(e['name'][:-len('_kernel_time')], e['args'].get('op_name', ''), e['dur']) for e in events
            if e.get('cat') == 'Node' and e.get('name', '').endswith('_kernel_time')]


def _ort_node_share(session, feed: Dict, runs: int, op_type: str) -> float:
    """Share of onnxruntime's node time (its profiler) spent in nodes of ``op_type``."""
    times = _ort_node_times(session, feed, runs)
    total = sum(t for _, _, t in times)
    return sum(t for _, op, t in times if op == op_type) / max(total, 1)


def _dpp_node_time(files: Dict[str, str], dpp_names: List[str], batch: int, size: int, threads: int,
                   runs: int = 5) -> dict:
    """The DPP layers' own onnxruntime time (profiler, ms per run): the DPP2d nodes of the custom file with the
    native kernel, and the nodes the decomposed file writes in their place (named ``<DPP2d node>/...``), with the
    decomposed time per operator type."""
    from ...export.onnx import onnx_session

    x = torch.randn(batch, 3, size, size).numpy()
    out = {'batch': batch}
    for mode in ('custom', 'decomposed'):
        session = onnx_session(files[mode], threads=threads, profile=True, spin=False)
        times = _ort_node_times(session, {session.get_inputs()[0].name: x}, runs)
        if mode == 'custom':
            out['custom_ms'] = sum(t for _, op, t in times if op == 'DPP2d') / runs / 1e3
            continue
        mine = [(op, t) for name, op, t in times if any(name.startswith(n + '/') for n in dpp_names)]
        out['decomposed_ms'] = sum(t for _, t in mine) / runs / 1e3
        by_op: Dict[str, float] = {}
        for op, t in mine:
            by_op[op] = by_op.get(op, 0.0) + t / runs / 1e3
        out['decomposed_by_op'] = dict(sorted(by_op.items(), key=lambda kv: -kv[1]))
    return out


def _export_three(name: str, size: int, folder: str):
    """The original and converted ``name`` (random init, default policy) and their ONNX files: original, converted
    decomposed, converted custom."""
    import copy
    import warnings

    import timm

    from ...export.onnx import export_onnx
    from ...surgery import convert

    torch.manual_seed(0)
    original = timm.create_model(name).eval()
    converted = copy.deepcopy(original)
    convert(converted, input_size=(3, size, size))
    example = torch.randn(1, 3, size, size)
    files, seconds = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for label, model, mode in (('original', original, 'decomposed'), ('decomposed', converted, 'decomposed'),
                                   ('custom', converted, 'custom')):
            t0 = time.perf_counter()
            files[label] = export_onnx(model, os.path.join(folder, f'{name}_{label}.onnx'), mode=mode,
                                       example_input=example)
            seconds[label] = time.perf_counter() - t0
            print(f'  exported {name} {label} in {seconds[label]:.0f} s', file=sys.stderr)
    summary = _file_summary(name, converted, files, seconds)
    from ...surgery import ConversionPolicy
    from ...zoo.runner import measure_cost
    gflops = measure_cost(original, converted, ConversionPolicy(), (3, size, size))['gflops']
    summary['flop_ratio'] = gflops['converted'] / gflops['unconverted']
    return original, converted, files, summary


def _file_summary(name: str, converted, files: Dict[str, str], seconds: Dict[str, float]) -> dict:
    """Node counts of the three files, the decomposition's nodes per DPP layer and the export times.

    A decomposed file has each DPP2d node of the custom file written out under the node's name (``name/...``): the
    nodes per layer are counted by that prefix, split into layers whose windows tile the input and the others."""
    import onnx

    from ...export import dpp_nodes
    from ...surgery import dpp_layers

    protos = {k: onnx.load(v) for k, v in files.items()}
    nodes = {k: len(p.graph.node) for k, p in protos.items()}
    custom = dpp_nodes(protos['custom'])
    per_layer = {'tiling': [], 'other': []}
    for node in custom:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        count = sum(1 for n in protos['decomposed'].graph.node if n.name.startswith(node.name + '/'))
        per_layer['tiling' if attrs['kernel_shape'] == attrs['strides'] else 'other'].append(count)
    return {'model': name, 'nodes': nodes, 'dpp_layers': len(dpp_layers(converted)), 'custom_nodes': len(custom),
            'dpp_nodes': [node.name for node in custom], 'nodes_per_layer': per_layer, 'export_s': seconds}


def _onnx_latencies(name: str, original, converted, files, args) -> List[dict]:
    """One row per batch size: median ms of torch eager (original, converted) and of every onnxruntime session."""
    from ...export.onnx import onnx_session
    from ...surgery import dpp_layers

    # timed in turn with torch and each other: no idle spinning that would take the cores of the next one
    sessions = {k: onnx_session(v, threads=args.threads, spin=False) for k, v in files.items()}
    sessions['custom (function)'] = onnx_session(files['custom'], threads=args.threads, native=False, spin=False)
    in_name = sessions['original'].get_inputs()[0].name
    rows = []
    for batch in args.batches:
        x = torch.randn(batch, 3, args.size, args.size)
        feed = {in_name: x.numpy()}

        def eager(m):
            def run():
                with torch.inference_mode():
                    m(x)
            return run

        fns = {'torch original': eager(original), 'torch converted': eager(converted)}
        for k, sess in sessions.items():
            fns[f'ort {k}'] = (lambda s: lambda: s.run(None, feed))(sess)
        times = interleaved_medians(fns, args.repeat, warmup=2)
        row = {'model': name, 'batch': batch, 'dpp_layers': len(dpp_layers(converted)), **times}
        rows.append(row)
        print(f'  {row}', file=sys.stderr)
    return rows


def _library_session(path: str, library: str, threads: int, profile: bool = False):
    """An onnxruntime CPU session for ``path`` with the custom-op library ``library`` registered (idle threads not
    spinning: sessions take turns)."""
    import tempfile

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.add_session_config_entry('session.intra_op.allow_spinning', '0')
    if profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tempfile.gettempdir(), f'dpp_surgery_bench_{os.getpid()}')
    opts.register_custom_ops_library(library)
    return ort.InferenceSession(path, sess_options=opts, providers=['CPUExecutionProvider'])


def _portable_vs_native(name: str, path: str, libraries: Dict[str, str], args, runs: int = 5) -> List[dict]:
    """The portable custom-op library against the ``-march=native`` build on one custom file, per batch size: the
    whole file's latency (interleaved medians) and the DPP2d nodes' own time (onnxruntime's profiler, the two
    libraries' sessions running in turn), with the largest relative difference of their outputs."""
    import numpy as np

    rows = []
    for batch in args.batches:
        x = torch.randn(batch, 3, args.size, args.size).numpy()
        sessions = {k: _library_session(path, lib, args.threads) for k, lib in libraries.items()}
        feed = {sessions['portable'].get_inputs()[0].name: x}
        outs = {k: s.run(None, feed)[0] for k, s in sessions.items()}
        times = interleaved_medians({k: (lambda s: lambda: s.run(None, feed))(s) for k, s in sessions.items()},
                                    args.repeat, warmup=2)
        del sessions
        profiled = {k: _library_session(path, lib, args.threads, profile=True) for k, lib in libraries.items()}
        for _ in range(runs):
            for s in profiled.values():
                s.run(None, feed)
        node_ms = {}
        for k, s in profiled.items():
            node_ms[k] = sum(t for _, op, t in _ort_node_times(s, feed, 0) if op == 'DPP2d') / runs / 1e3
        error = float(np.abs(outs['portable'] - outs['native']).max() / np.abs(outs['native']).max())
        row = {'model': name, 'batch': batch, 'portable ms': times['portable'], 'native ms': times['native'],
               'portable DPP2d ms': node_ms['portable'], 'native DPP2d ms': node_ms['native'], 'max_rel_diff': error}
        rows.append(row)
        print(f'  {row}', file=sys.stderr)
    return rows


def _build_libraries(folder: str) -> Tuple[Dict[str, str], dict]:
    """The portable custom-op library and its ``-march=native`` build under ``folder``, and the portable one's
    manifest."""
    from ...native.ort_kernel import MANIFEST_NAME, build_ort_library

    libraries = {kind: build_ort_library(os.path.join(folder, kind), portable=kind == 'portable')
                 for kind in ('portable', 'native')}
    with open(os.path.join(folder, 'portable', MANIFEST_NAME)) as f:
        return libraries, json.load(f)


def bench_onnx(args) -> dict:
    """Latency of original and converted models in torch eager and onnxruntime (decomposed, custom kernel); with
    ``args.portable``, the portable custom-op library against a ``-march=native`` build."""
    import tempfile

    from ...export import runtime_version
    from ...export.onnx import onnx_session

    note_ort_kernel("'custom'")
    rows: List[dict] = []
    shares: Dict[str, float] = {}
    layer_times: Dict[str, dict] = {}
    summaries: List[dict] = []
    portable_rows: List[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        libraries, manifest = _build_libraries(tmp) if args.portable else ({}, {})
        for name in args.models:
            original, converted, files, summary = _export_three(name, args.size, tmp)
            summaries.append(summary)
            rows += _onnx_latencies(name, original, converted, files, args)
            profiled = onnx_session(files['custom'], threads=args.threads, profile=True)
            x = torch.randn(args.batches[-1], 3, args.size, args.size)
            shares[name] = _ort_node_share(profiled, {profiled.get_inputs()[0].name: x.numpy()}, 5, 'DPP2d')
            layer_times[name] = _dpp_node_time(files, summary['dpp_nodes'], args.batches[-1], args.size,
                                               args.threads)
            if libraries:
                portable_rows += _portable_vs_native(name, files['custom'], libraries, args)
    checks = onnx_latency_checks(rows, shares) + onnx_file_checks(summaries, rows) + portable_checks(portable_rows)
    return {'machine': machine_description(), 'versions': {'onnxruntime': runtime_version('onnxruntime')},
            'rows': rows, 'dpp_share': shares, 'dpp_time': layer_times, 'files': summaries,
            'portable_vs_native': portable_rows, 'ort_library': manifest, 'checks': checks}


def onnx_latency_checks(rows: List[dict], shares: Dict[str, float]) -> List[dict]:
    """The latency table's targets: onnxruntime faster than torch eager, the kernel faster than the decomposition
    and the decomposition within :data:`DECOMPOSED_OVER_CUSTOM_TARGET` of it, resnet50's share in DPP2d nodes."""
    checks = [
        check('every converted model faster in onnxruntime (custom) than in torch eager',
              all(r['ort custom'] < r['torch converted'] for r in rows)),
        check('every converted model faster in onnxruntime (decomposed) than in torch eager',
              all(r['ort decomposed'] < r['torch converted'] for r in rows)),
        check('custom kernel faster than the decomposition on every model and batch',
              all(r['ort custom'] < r['ort decomposed'] for r in rows)),
    ]
    for r in rows:
        ratio = r['ort decomposed'] / r['ort custom']
        checks.append(check(f"{r['model']} batch {r['batch']}: onnxruntime decomposed / custom {ratio:.2f}x <= "
                            f'{DECOMPOSED_OVER_CUSTOM_TARGET}x', ratio <= DECOMPOSED_OVER_CUSTOM_TARGET))
    if 'resnet50' in shares:
        checks.append(check(f'DPP2d nodes <= {100 * DPP_SHARE_TARGET:.0f}% of converted resnet50 onnxruntime time '
                            f'({100 * shares["resnet50"]:.1f}%)', shares['resnet50'] <= DPP_SHARE_TARGET))
    return checks


def onnx_file_checks(summaries: List[dict], rows: List[dict]) -> List[dict]:
    """The file table's targets: nodes per tiling DPP layer (where there are such layers), the export time of each
    mode against the original's, the decomposed file's latency against the original's next to the FLOP ratio."""
    checks = []
    for s in summaries:
        tiling, t = s['nodes_per_layer']['tiling'], s['export_s']
        if tiling:
            checks.append(check(f"{s['model']}: at most {max(tiling)} ONNX nodes per tiling DPP layer <= "
                                f'{NODES_PER_LAYER_TARGET}', max(tiling) <= NODES_PER_LAYER_TARGET))
        for mode in ('decomposed', 'custom'):
            ratio = t[mode] / t['original']
            checks.append(check(f"{s['model']}: {mode} export {ratio:.2f}x the original's <= {EXPORT_TIME_TARGET}x",
                                ratio <= EXPORT_TIME_TARGET))
        for r in (r for r in rows if r['model'] == s['model']):
            ratio = r['ort decomposed'] / r['ort original']
            checks.append(check(f"{s['model']} batch {r['batch']}: onnxruntime decomposed / original {ratio:.2f}x <= "
                                f"FLOP ratio {s['flop_ratio']:.2f}", ratio <= s['flop_ratio']))
    return checks


def portable_checks(rows: List[dict]) -> List[dict]:
    """The portable library's DPP2d time within :data:`PORTABLE_OVER_NATIVE_TARGET` of the ``-march=native``
    build's, per model and batch."""
    checks = []
    for r in rows:
        ratio = r['portable DPP2d ms'] / r['native DPP2d ms']
        checks.append(check(f"{r['model']} batch {r['batch']}: portable library's DPP2d time {ratio:.3f}x the "
                            f"-march=native build's <= {PORTABLE_OVER_NATIVE_TARGET}x",
                            ratio <= PORTABLE_OVER_NATIVE_TARGET))
    return checks


def render_onnx(record: dict) -> str:
    """``bench onnx``'s Markdown: latency, the DPP2d share, the DPP layers' own time, the files, and the portable
    library against the native build (where measured), then the targets."""
    s = record['settings']
    portable = record.get('portable_vs_native') or []
    intro = (f"Latency (median ms of {s['repeat']} interleaved runs) of original and converted models at {s['size']} "
             f"px, {s['threads']} threads, random init weights, default policy, in torch eager and onnxruntime "
             f"{record['versions']['onnxruntime']} (CPU execution provider, idle threads not spinning, since the runs "
             'take turns). "custom" registers the native DPP2d kernel; "custom (function)" is the same file run by '
             'plain onnxruntime (its ONNX functions). Then the DPP layers\' own time in onnxruntime, the ONNX files '
             'with their node counts and export times'
             + (', and the portable custom-op library against a -march=native build of it.' if portable else '.'))
    batch = s['batches'][-1]
    return _markdown(
        intro, f"Measured on: {record['machine']}.", _latency_table(record['rows']),
        'Share of onnxruntime node time in DPP2d nodes (custom kernel, batch '
        f'{batch}, profiler): ' + ', '.join(f'{k} {100 * v:.1f}%' for k, v in record['dpp_share'].items()) + '.',
        f"The DPP layers' own onnxruntime time (profiler, ms per run at batch {batch}, {s['size']} px): the custom "
        "file's DPP2d nodes (native kernel) and the nodes the decomposed file has in their place, with the operator "
        'types that take most of the latter:', _dpp_time_table(record['dpp_time']),
        f"ONNX files at {s['size']} px (dynamic batch and spatial sizes): node counts, the decomposition's nodes per "
        'DPP layer (each DPP2d node of the custom file as written out in the decomposed file, the shape arithmetic '
        'for dynamic sizes included: the largest count over the layers whose windows tile the input, and over the '
        'others) and export time (export_onnx, without verification):', _file_table(record['files']),
        _portable_intro(record['ort_library'], s) if portable else '', _portable_table(portable) if portable else '',
        _targets(record['checks']))


_LATENCY_COLUMNS = ['torch original', 'torch converted', 'ort original', 'ort decomposed', 'ort custom',
                    'ort custom (function)']


def _latency_table(rows: List[dict]) -> str:
    header = (['model', 'batch', 'DPP layers'] + _LATENCY_COLUMNS
              + ['converted: eager / ort custom', 'decomposed / custom'])
    return _table(header, [
        f"| {r['model']} | {r['batch']} | {r['dpp_layers']} | " + ' | '.join(f'{r[c]:.1f}' for c in _LATENCY_COLUMNS)
        + f" | {r['torch converted'] / r['ort custom']:.2f}x | {r['ort decomposed'] / r['ort custom']:.2f}x |"
        for r in rows])


def _dpp_time_table(layer_times: Dict[str, dict]) -> str:
    """Where the decomposed file's extra time goes: the DPP layers' own node time in each file."""
    lines = []
    for name, t in layer_times.items():
        total = max(t['decomposed_ms'], 1e-9)
        ops = ', '.join(f'{op} {100 * ms / total:.0f}%' for op, ms in list(t['decomposed_by_op'].items())[:5])
        lines.append(f"| {name} | {t['custom_ms']:.1f} | {t['decomposed_ms']:.1f} | "
                     f"{t['decomposed_ms'] / max(t['custom_ms'], 1e-9):.1f}x | {ops} |")
    return _table(['model', 'DPP2d nodes, custom ms', 'their decomposition ms', 'decomposition / kernel',
                   'decomposition by operator'], lines)


def _file_table(summaries: List[dict]) -> str:
    def most(counts):
        return str(max(counts)) if counts else '-'

    lines = []
    for s in summaries:
        n, t, per = s['nodes'], s['export_s'], s['nodes_per_layer']
        lines.append(f"| {s['model']} | {s['dpp_layers']} ({len(per['tiling'])}) | {n['original']} | "
                     f"{n['decomposed']} | {n['custom']} | {most(per['tiling'])} | {most(per['other'])} | "
                     f"{t['original']:.1f} | {t['decomposed']:.1f} | {t['custom']:.1f} | "
                     f"{t['decomposed'] / t['original']:.2f}x | {t['custom'] / t['original']:.2f}x |")
    return _table(['model', 'DPP layers (tiling windows)', 'nodes original', 'nodes decomposed', 'nodes custom',
                   'nodes per tiling DPP layer', 'per other DPP layer', 'export s original', 'decomposed', 'custom',
                   'decomposed / original', 'custom / original'], lines)


def _portable_intro(manifest: dict, s: dict) -> str:
    return (f"The portable onnxruntime custom-op library (dpp-surgery ort-library: {', '.join(manifest['isa_paths'])}"
            f", chosen at run time, here {manifest['isa_selected_here']}; glibc >= {manifest['min_glibc']}, no "
            f"OpenMP) against the -march=native build (OpenMP), the same custom files, {s['size']} px, {s['threads']} "
            f"threads: median ms of {s['repeat']} interleaved runs, and the DPP2d nodes' own time (profiler, runs "
            'alternating):')


def _portable_table(rows: List[dict]) -> str:
    lines = []
    for r in rows:
        ratio, node_ratio = r['portable ms'] / r['native ms'], r['portable DPP2d ms'] / r['native DPP2d ms']
        lines.append(f"| {r['model']} | {r['batch']} | {r['portable ms']:.1f} | {r['native ms']:.1f} | {ratio:.3f}x | "
                     f"{r['portable DPP2d ms']:.2f} | {r['native DPP2d ms']:.2f} | {node_ratio:.3f}x | "
                     f"{r['max_rel_diff']:.1e} |")
    return _table(['model', 'batch', 'portable ms', 'native ms', 'portable / native', 'DPP2d portable ms',
                   'DPP2d native ms', 'DPP2d portable / native', 'max rel. difference'], lines)


# ------------------------------------------------------------------------------------------------ bench runtimes


def _runtime_rows(name: str, original, converted, files: Dict[str, str], flop_ratio: float, batch: int,
                  args) -> List[dict]:
    """One row per runtime for ``name`` at ``batch``: the median ms of each of its files and their largest error
    against PyTorch."""
    import numpy as np

    from ...export import runtime_session

    shape = (batch, 3, args.size, args.size)
    x = torch.randn(*shape)
    with torch.inference_mode():
        want = {'original': original(x).numpy(), 'decomposed': converted(x).numpy()}
    want['custom'] = want['decomposed']
    rows = []
    for runtime in args.runtimes:  # one runtime at a time: another's idle threads would take the cores
        kinds = ('original', 'decomposed', 'custom') if runtime == 'onnxruntime' else ('original', 'decomposed')
        fns, errors = {}, {}
        for kind in kinds:
            run = runtime_session(files[kind], runtime, shape, threads=args.threads)
            out = run(x.numpy())[0]
            errors[kind] = float(np.abs(out - want[kind]).max() / np.abs(want[kind]).max())
            fns[kind] = (lambda run: lambda: run(x.numpy()))(run)
        times = interleaved_medians(fns, args.repeat, warmup=2)
        del fns, run
        rows.append({'model': name, 'batch': batch, 'runtime': runtime, 'flop_ratio': flop_ratio, **times,
                     'max_error': max(errors.values())})
        print(f'  {rows[-1]}', file=sys.stderr)
    return rows


def bench_runtimes(args) -> dict:
    """The decomposed file in every runtime: latency of the original's and the converted model's files in onnxruntime,
    OpenVINO and tract (and onnxruntime's custom file with the native kernel), each checked against PyTorch, with the
    decomposed / original ratio next to the converted model's FLOP ratio."""
    import tempfile

    from ...export import RuntimeUnavailableError, runtime_version

    versions = {}
    for runtime in args.runtimes:
        try:
            versions[runtime] = runtime_version(runtime)
        except RuntimeUnavailableError as e:
            raise SystemExit(f'error: {e}') from None
    rows: List[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            original, converted, files, summary = _export_three(name, args.size, tmp)
            for batch in args.batches:
                rows += _runtime_rows(name, original, converted, files, summary['flop_ratio'], batch, args)
    return {'machine': machine_description(), 'versions': versions, 'rows': rows, 'checks': runtimes_checks(rows)}


def runtimes_checks(rows: List[dict]) -> List[dict]:
    """Per row: every file within :data:`ERROR_TARGET` of PyTorch, and decomposed / original at most the FLOP
    ratio."""
    checks = []
    for r in rows:
        ratio = r['decomposed'] / r['original']
        where = f"{r['model']} batch {r['batch']} in {r['runtime']}"
        checks.append(check(f"{where}: every file within 1e-4 of PyTorch ({r['max_error']:.1e})",
                            r['max_error'] <= ERROR_TARGET))
        checks.append(check(f"{where}: decomposed / original {ratio:.2f}x <= FLOP ratio {r['flop_ratio']:.2f}",
                            ratio <= r['flop_ratio']))
    return checks


def render_runtimes(record: dict) -> str:
    """``bench runtimes``' Markdown: one row per model, batch and runtime, then the targets."""
    s = record['settings']
    intro = (f"The decomposed file in other runtimes: median ms of {s['repeat']} interleaved runs of each runtime's "
             f"files, one runtime after the other, at {s['size']} px, random init weights, default policy, "
             f"{s['threads']} threads (tract runs on one); "
             + ', '.join(f'{k} {v}' for k, v in record['versions'].items())
             + ', CPU; OpenVINO in float32 (its default on CPUs with native bfloat16 is bfloat16). "custom" is '
             "onnxruntime's custom file with the native kernel. error: max |runtime - PyTorch| / max |PyTorch| over "
             'the files of the row.')
    return _markdown(intro, f"Measured on: {record['machine']}.", _runtimes_table(record['rows']),
                     _targets(record['checks']))


def _runtimes_table(rows: List[dict]) -> str:
    lines = []
    for r in rows:
        custom = r.get('custom')
        ratio = r['decomposed'] / r['original']
        custom_ms, over_custom = (f'{custom:.1f}', f"{r['decomposed'] / custom:.2f}x") if custom else ('-', '-')
        lines.append(f"| {r['model']} | {r['batch']} | {r['runtime']} | {r['original']:.1f} | "
                     f"{r['decomposed']:.1f} | {custom_ms} | {ratio:.2f}x | {r['flop_ratio']:.2f} | {over_custom} | "
                     f"{r['max_error']:.1e} |")
    return _table(['model', 'batch', 'runtime', 'original', 'converted, decomposed', 'custom',
                   'decomposed / original', 'FLOP ratio', 'decomposed / custom', 'max error'], lines)


# ---------------------------------------------------------------------------------------------- bench onnx-layer


ONNX_LAYER_CASES = {  # name -> (kernel, stride, padding): the ResNet stem (overlapping windows) and a 2x2 layer
    'stem': (3, 2, 1),
    'tile': (2, 2, 0),
}


# element-wise operators timed on a layer's unfolded windows: what the decomposition uses or could use for its powers
ONNX_PROBE_OPS = ('Exp', 'Log', 'Pow', 'Mul', 'Sqrt', 'Tanh', 'Sigmoid', 'Erf')


class _ChannelGroups(torch.nn.Module):
    """One DPP layer computed as ``groups`` DPP layers over equal channel groups (their parameters the layer's):
    the same output, written by the decomposition as one chain per group."""

    def __init__(self, layer: DPP2d, groups: int):
        super().__init__()
        c = layer.channels // groups
        kernel, stride, padding = layer.geometry.kernel, layer.geometry.stride, layer.geometry.padding
        self.parts = torch.nn.ModuleList()
        for i in range(groups):
            part = DPP2d(c, kernel_size=kernel, stride=stride, padding=padding)
            with torch.no_grad():
                part.theta_alpha.copy_(layer.theta_alpha[i * c:(i + 1) * c])
                part.theta_lambda.copy_(layer.theta_lambda[i * c:(i + 1) * c])
            self.parts.append(part)

    def forward(self, x):
        chunks = torch.chunk(x, len(self.parts), dim=1)
        return torch.cat([part(t) for part, t in zip(self.parts, chunks)], dim=1)


def _probe_model(op: str, shape: Tuple[int, ...], path: str) -> str:
    """Write a one-node ONNX model applying ``op`` to an input of ``shape`` (``Pow`` and ``Mul`` with a per-channel
    second operand, as the decomposition's weights would) to ``path``; returns ``path``."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = []
    inputs = ['X']
    if op in ('Pow', 'Mul'):
        per_channel = np.linspace(0.3, 1.5, shape[1], dtype=np.float32).reshape(1, shape[1], *([1] * (len(shape) - 2)))
        inits.append(numpy_helper.from_array(per_channel, 'P'))
        inputs.append('P')
    graph = helper.make_graph([helper.make_node(op, inputs, ['Y'])], op,
                              [helper.make_tensor_value_info('X', TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info('Y', TensorProto.FLOAT, list(shape))], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 18)])
    model.ir_version = 9
    onnx.save(model, path)
    return path


def _layer_files(name: str, c: int, size: int, groups: List[int], folder: str) -> Tuple[DPP2d, dict, dict]:
    """The ``name`` layer of ``c`` channels for inputs of ``size`` (parameters away from the init, as a trained
    layer's are) and its files: ``'kernel'`` (custom), and the decomposition split into each of ``groups`` (keyed
    by the group count as a string; ``'1'``: as written), with their node counts."""
    import warnings

    import onnx

    from ...export.onnx import export_onnx

    k, s, p = ONNX_LAYER_CASES[name]
    layer = DPP2d(c, kernel_size=k, stride=s, padding=p).eval()
    with torch.no_grad():
        layer.theta_alpha.normal_(0, 0.3)
        layer.theta_lambda.normal_(0, 0.3)
    example = torch.randn(1, c, size, size)
    files, nodes = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        files['kernel'] = export_onnx(layer, os.path.join(folder, f'{name}_custom.onnx'), mode='custom',
                                      example_input=example, min_size=min(size, 64))
        for g in groups:
            model = layer if g == 1 else _ChannelGroups(layer, g).eval()
            files[str(g)] = export_onnx(model, os.path.join(folder, f'{name}_g{g}.onnx'), example_input=example,
                                        min_size=min(size, 64))
            nodes[str(g)] = len(onnx.load(files[str(g)]).graph.node)
    return layer, files, nodes


def _time_layer(name: str, layer: DPP2d, size: int, files: dict, nodes: dict, args) -> List[dict]:
    """One row per batch: the median ms of each file of the layer and its error against PyTorch."""
    import numpy as np

    from ...export.onnx import onnx_session

    k, s, p = ONNX_LAYER_CASES[name]
    c = layer.channels
    sessions = {key: onnx_session(f, threads=args.threads, spin=False) for key, f in files.items()}
    rows = []
    for batch in args.batches:
        x = torch.randn(batch, c, size, size)
        with torch.inference_mode():
            want = layer(x).numpy()
        feed = {sessions['kernel'].get_inputs()[0].name: x.numpy()}
        errors = {key: float(np.abs(sess.run(None, feed)[0] - want).max() / np.abs(want).max())
                  for key, sess in sessions.items()}
        fns = {key: (lambda sess: lambda: sess.run(None, feed))(sess) for key, sess in sessions.items()}
        times = interleaved_medians(fns, args.repeat, warmup=2)
        rows.append({'layer': name, 'channels': c, 'size': size, 'kernel': k, 'stride': s, 'padding': p,
                     'batch': batch, 'kernel_ms': times['kernel'],
                     'groups': {g: {'ms': times[g], 'nodes': nodes[g], 'error': errors[g]} for g in nodes},
                     'kernel_error': errors['kernel'], 'max_error': max(errors.values())})
        print(f'  {rows[-1]}', file=sys.stderr)
    return rows


def _probe_ops(name: str, c: int, size: int, batch: int, folder: str, args) -> dict:
    """The element-wise operators of :data:`ONNX_PROBE_OPS` alone on the ``name`` layer's unfolded windows at
    ``batch`` (median ms each)."""
    import numpy as np

    from ...export.onnx import onnx_session

    k, s, p = ONNX_LAYER_CASES[name]
    out = (size + 2 * p - k) // s + 1
    shape = (batch, c, k * k, out, out)  # the decomposition's unfolded windows
    x = np.random.default_rng(0).uniform(0.01, 1.0, shape).astype(np.float32)
    sessions = {op: onnx_session(_probe_model(op, shape, os.path.join(folder, f'{name}_{op}.onnx')),
                                 threads=args.threads, spin=False) for op in ONNX_PROBE_OPS}
    times = interleaved_medians({op: (lambda sess: lambda: sess.run(None, {'X': x}))(sess)
                                 for op, sess in sessions.items()}, args.repeat, warmup=2)
    return {'layer': name, 'shape': list(shape), 'ms': times}


def bench_onnx_layer(args) -> dict:
    """One DPP layer in onnxruntime: the native kernel, the decomposition as written, and the decomposition split
    into channel groups (one chain per group, for the cache), at each batch; then element-wise operators on the
    layer's unfolded windows."""
    import tempfile

    from ...export import runtime_version

    note_ort_kernel("'native kernel'")
    cases = {'stem': args.stem, 'tile': args.tile}
    for name, (c, _) in cases.items():
        bad = [g for g in args.groups if g < 1 or c % g]
        if bad:
            raise SystemExit(f'error: --groups {bad[0]} does not divide the {name} layer\'s {c} channels; pass '
                             f'divisors of {c}')
    groups = sorted(set(args.groups) | {1})
    rows, probes = [], []
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        for name, (c, size) in cases.items():
            layer, files, nodes = _layer_files(name, c, size, groups, tmp)
            rows += _time_layer(name, layer, size, files, nodes, args)
            probes.append(_probe_ops(name, c, size, args.batches[-1], tmp, args))
    return {'machine': machine_description(), 'versions': {'onnxruntime': runtime_version('onnxruntime')},
            'rows': rows, 'probes': probes, 'checks': onnx_layer_checks(rows)}


def onnx_layer_checks(rows: List[dict]) -> List[dict]:
    """Every form of each layer (kernel, decomposition, its channel groups) within :data:`ERROR_TARGET` of
    PyTorch, per layer and batch."""
    return [check(f"{r['layer']} batch {r['batch']}: every form matches PyTorch within 1e-4 "
                  f"({r['max_error']:.1e})", r['max_error'] <= ERROR_TARGET) for r in rows]


def render_onnx_layer(record: dict) -> str:
    """``bench onnx-layer``'s Markdown: the layer table, the element-wise operator table, the targets."""
    s = record['settings']
    intro = (f"One DPP layer in onnxruntime {record['versions']['onnxruntime']} (CPU execution provider, "
             f"{s['threads']} threads, idle threads not spinning; medians of {s['repeat']} interleaved runs, ms): the "
             'custom file with the native kernel, and the decomposed file as written and with the layer split into '
             'channel groups (one chain per group); error: max |onnxruntime - PyTorch| / max |PyTorch|.')
    probes = record['probes']
    batch = probes[0]['shape'][0] if probes else s['batches'][-1]
    return _markdown(
        intro, f"Measured on: {record['machine']}.", _onnx_layer_table(record['rows']),
        f'Element-wise operators alone on the unfolded windows at batch {batch} (ms; Pow and Mul with a per-channel '
        'second operand), and as a multiple of Exp:', _probe_table(probes), _targets(record['checks']))


def _onnx_layer_table(rows: List[dict]) -> str:
    split = sorted((g for g in rows[0]['groups'] if g != '1'), key=int) if rows else []
    header = (['layer', 'input', 'batch', 'native kernel', 'decomposed (nodes)']
              + [f'{g} groups (nodes)' for g in split] + ['decomposed / kernel']
              + [f'{g} groups / decomposed' for g in split] + ['max error'])
    lines = []
    for r in rows:
        gs = r['groups']
        one = gs['1']['ms']
        geometry = f"{r['kernel']}x{r['kernel']}/s{r['stride']}/p{r['padding']}"
        lines.append(f"| {r['layer']} ({geometry}) | {r['channels']}x{r['size']}x{r['size']} | {r['batch']} | "
                     f"{r['kernel_ms']:.2f} | {one:.2f} ({gs['1']['nodes']}) | "
                     + ''.join(f"{gs[g]['ms']:.2f} ({gs[g]['nodes']}) | " for g in split)
                     + f"{one / r['kernel_ms']:.2f}x | " + ''.join(f"{gs[g]['ms'] / one:.2f}x | " for g in split)
                     + f"{r['max_error']:.1e} |")
    return _table(header, lines)


def _probe_table(probes: List[dict]) -> str:
    ops = list(probes[0]['ms']) if probes else list(ONNX_PROBE_OPS)
    lines = [f"| {pr['layer']} | {'x'.join(map(str, pr['shape']))} | "
             + ''.join(f"{pr['ms'][op]:.2f} | " for op in ops)
             + f"{pr['ms']['Log'] / pr['ms']['Exp']:.2f}x | {pr['ms']['Pow'] / pr['ms']['Log']:.2f}x |"
             for pr in probes]
    return _table(['layer', 'shape', *ops, 'Log / Exp', 'Pow / Log'], lines)
