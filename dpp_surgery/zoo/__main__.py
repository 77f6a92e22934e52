"""``python -m dpp_surgery.zoo {list,run,table}``: see :mod:`dpp_surgery.zoo.runner`."""
import sys

from .runner import main

sys.exit(main())
