"""``python -m dpp_surgery.experiments``: runs :mod:`dpp_surgery.tools.experiments` (importing this module runs nothing)."""
if __name__ == '__main__':
    import sys

    from dpp_surgery.tools.experiments import main

    sys.exit(main())
