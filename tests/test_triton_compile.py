"""The Triton kernels compiled ahead of time for sm_90 and sm_80 on this machine (no GPU needed): no compile
error, no register spill, and the theoretical occupancy targets (dpp_surgery.native.triton_aot)."""
import pytest

from dpp_surgery.native import triton_aot

pytest.importorskip('triton')
_TOOLS = triton_aot.tools()
pytestmark = pytest.mark.skipif(_TOOLS['error'] is not None, reason=f'cannot compile for a GPU: {_TOOLS["error"]}')

# the covering subset on sm_90, its first half on sm_80 too (a compile takes 0.5-1 s)
COVERING = [(spec, 90) for spec in triton_aot.covering_specs()] + [(spec, 80) for spec in
                                                                    triton_aot.covering_specs()[::3]]
FULL = [(spec, arch) for arch in triton_aot.ARCHS for spec in triton_aot.all_specs()]


def _check(spec, arch):
    row = triton_aot.compile_spec(spec, arch)
    assert row['registers'] > 0
    assert triton_aot.meets_targets(row) == [], row


@pytest.mark.parametrize('spec,arch', COVERING, ids=[f'{s.name}-sm_{a}'.replace(' ', '-') for s, a in COVERING])
def test_compiles_without_spills_at_target_occupancy(spec, arch):
    _check(spec, arch)


@pytest.mark.slow
@pytest.mark.parametrize('spec,arch', FULL, ids=[f'{s.name}-sm_{a}'.replace(' ', '-') for s, a in FULL])
def test_every_specialization(spec, arch):
    _check(spec, arch)


def test_covering_subset_covers_every_factor():
    specs = triton_aot.covering_specs()
    for field, values in (('kernel', triton_aot.KERNELS), ('guide', triton_aot.GUIDES),
                          ('reward', triton_aot.REWARDS), ('norm', triton_aot.NORMS), ('dtype', triton_aot.DTYPES),
                          ('layout', triton_aot.LAYOUTS), ('geometry', triton_aot.GEOMETRIES)):
        assert {getattr(s, field) for s in specs} == set(values), field
    assert set(specs) <= set(triton_aot.all_specs())


def test_occupancy_arithmetic():
    # 128 registers x 4 warps: 16 KiB a block, 4 blocks = 16 warps of 64 (25%); 129 registers: 3 blocks
    assert triton_aot.occupancy(128, 4, 0, 90) == {'occupancy': 0.25, 'blocks_per_sm': 4, 'limiter': 'registers'}
    assert triton_aot.occupancy(129, 4, 0, 90)['occupancy'] == 12 / 64
    assert triton_aot.occupancy(32, 4, 0, 80) == {'occupancy': 1.0, 'blocks_per_sm': 16, 'limiter': 'warps'}
    assert triton_aot.occupancy(32, 1, 0, 90)['limiter'] == 'blocks'  # 32 blocks of one warp: 50%
    # shared memory: 100 KiB a block fits once in sm_80's 164 KiB, twice in sm_90's 228 KiB
    assert triton_aot.occupancy(32, 4, 100 * 1024, 80)['blocks_per_sm'] == 1
    assert triton_aot.occupancy(32, 4, 100 * 1024, 90)['blocks_per_sm'] == 2


def test_report_and_bench_subcommand(tmp_path, capsys):
    import json

    from dpp_surgery.tools import bench
    path = tmp_path / 'report.json'
    specs = triton_aot.covering_specs()[:1]
    result = triton_aot.report(specs, archs=(90,))
    assert len(result['rows']) == 1 and result['missed'] == [] and result['triton']
    table = triton_aot.format_table(result['rows'])
    assert '| kernel | arch | registers | stack B |' in table and 'sm_90' in table
    assert bench.main(['--json', str(path), 'triton-report', '--covering', '--arch', '90']) == 0
    out = capsys.readouterr().out
    assert 'Triton ' in out and 'PASS: no register spill' in out
    saved = json.loads(path.read_text())
    assert len(saved['rows']) == len(triton_aot.covering_specs()) and saved['triton']
    assert bench.render(saved) in out and saved['specializations'] == len(saved['rows']) and saved['archs'] == [90]


def test_launch_config_reads_the_norm_code_the_kernels_take():
    from dpp_surgery.native import triton_dpp
    from dpp_surgery.native.kernel import NORM_CODES

    assert {code: triton_dpp._NORM_NAMES[code] for code in NORM_CODES.values()} == {
        code: name for name, code in NORM_CODES.items()}
    assert triton_dpp.launch_config('backward', 64, False, 4, 'sum') != triton_dpp.launch_config('backward', 64, False)
