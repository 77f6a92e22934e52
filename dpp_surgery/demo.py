"""``python -m dpp_surgery.demo``: runs :mod:`dpp_surgery.tools.demo` (importing this module runs nothing)."""
if __name__ == '__main__':
    import sys

    from dpp_surgery.tools.demo import main

    sys.exit(main())
