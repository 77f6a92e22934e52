"""``python -m dpp_surgery.zoo {list,run,table}``: see :mod:`dpp_surgery.tools.zoo`."""
import sys

from ..tools.zoo import main

sys.exit(main())
