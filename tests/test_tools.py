"""The benchmarks run end to end (tiny sizes) and print what they promise (the demo: tests/test_demo.py)."""
import json

from dpp_surgery.tools import bench


def test_first_line_strips_colour_codes_and_falls_back():
    from dpp_surgery.utils import first_line
    assert first_line(RuntimeError('\x1b[96mstep 2/3\x1b[0m failed\nmore detail')) == 'step 2/3 failed'
    assert first_line(ValueError('')) == 'ValueError'
    assert first_line(ValueError('  \n'), '') == ''
