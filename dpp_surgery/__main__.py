"""``python -m dpp_surgery`` is the ``dpp-surgery`` command."""
import sys

from .cli import main

sys.exit(main())
