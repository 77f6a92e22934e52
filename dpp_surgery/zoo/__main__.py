"""``python -m dpp_surgery.zoo {list,run,table}``: see :mod:`dpp_surgery.zoo.run`."""
import sys

from .run import main

sys.exit(main())
