"""``bench coverage``: plan + convert + forward + backward on one small model of every timm family."""
from __future__ import annotations

import functools
import os

os.environ.setdefault('KINETO_LOG_LEVEL', '5')  # keep the profiler's start/stop chatter out of the tables


from ...timing import machine_description

def bench_coverage(args) -> dict:
    from ..coverage import export_check, run_coverage, summarize
    from ...export.onnx import SUPPORTED_MODES

    checks = [] if args.no_export else [functools.partial(export_check, timeout=args.export_timeout)]
    results = run_coverage(args.families or None, size=args.size, csv_path=args.csv, progress=True,
                           extra_checks=checks, per_family=args.per_family, operator=args.operator)
    policy = 'default policy' + (f', operator {args.operator}' if args.operator else '')
    print(f'\nCoverage of convert() across timm ({policy}, pretrained=False, up to {args.per_family} models per '
          f'family, {args.size} px unless the model has a fixed input size; forward and backward after conversion'
          + ('' if args.no_export else "; ONNX export in each mode, verified in onnxruntime, for each family's first "
             'model') + ')')
    print(f'machine: {machine_description()}\n')
    modes = [] if args.no_export else list(SUPPORTED_MODES)
    head = ['family', 'model', 'sites', 'convertible', 'converted', 'census', 'census converted', 'census policy',
            'census limited', 'census missed', 'fwd', 'bwd', 'shape', 'status']
    head += [f'onnx {m}' for m in modes] + [f'parity {m}' for m in modes] + ['note']
    print('| ' + ' | '.join(head) + ' |')
    print('|' + '---|' * len(head))
    for r in results:
        yn = lambda b: 'yes' if b else 'no'  # noqa: E731
        cells = [r.family, r.model, r.sites, r.convertible, r.converted, r.census, r.census_converted,
                 r.census_policy, r.census_limited, r.census_missed, yn(r.forward_ok), yn(r.backward_ok),
                 yn(r.shape_ok), r.status]
        cells += [r.extra.get(f'onnx_{m}', '') for m in modes] + [r.extra.get(f'parity_{m}', '') for m in modes]
        cells.append(r.reason)
        print('| ' + ' | '.join(str(c).replace('|', '/') for c in cells) + ' |')
    print()
    print(summarize(results))
    if args.csv:
        print(f'\nwrote {args.csv}')
    from dataclasses import asdict
    return {'machine': machine_description(), 'results': [asdict(r) for r in results]}
