"""Moved to :mod:`dpp_surgery.timing`; this path works for one more release."""
import importlib
import sys
import warnings

# a deprecated path, outside the layering: it only points to the new module
__moved_to__ = 'dpp_surgery.timing'

warnings.warn(f'{__name__} moved to {__moved_to__}; import it from there (the old path goes in the next release)',
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module(__moved_to__)
