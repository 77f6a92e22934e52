"""``python -m dpp_surgery.bench``: runs :mod:`dpp_surgery.tools.bench` (importing this module runs nothing)."""
if __name__ == '__main__':
    import sys

    from dpp_surgery.tools.bench import main

    sys.exit(main())
