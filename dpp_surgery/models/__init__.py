"""Models: the offline ImageNet EfficientNet-Lite0 weights (:mod:`.weights`) and the paper's small network
(:mod:`.smallnet`).

The zoo's registry moved to :mod:`dpp_surgery.zoo`; its names are still readable from here for one release (with a
DeprecationWarning).
"""
import importlib
import warnings

# the zoo's names this package exported before the zoo got its own package
_MOVED = ('Recipe', 'RecipeError', 'RecipeWarning', 'create_zoo_model', 'default_zoo_dir', 'get_recipe',
          'list_recipes', 'load_recipe', 'load_recipes', 'register_recipe', 'register_recipes', 'registered_recipes')

__all__ = []


def __getattr__(name: str):
    if name in _MOVED:
        warnings.warn(f'dpp_surgery.models.{name} moved to dpp_surgery.zoo.{name}; import it from there (the old path '
                      'goes in the next release)', DeprecationWarning, stacklevel=2)
        # resolved by name: models sits below the zoo, which it must not import
        return getattr(importlib.import_module('dpp_surgery.zoo'), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
