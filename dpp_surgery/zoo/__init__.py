"""Models and recipes of the dpp_surgery zoo.

Every recipe ``zoo/<arch>_dpp.json`` is registered with timm as the model ``<arch>_dpp`` when :mod:`dpp_surgery` is
imported (see :mod:`dpp_surgery.zoo.registry`). ``python -m dpp_surgery.zoo {list,run,table}`` lists the recipes,
runs one (fine-tune, accuracy, parameters, GFLOPs, latency in PyTorch and onnxruntime) and regenerates
``zoo/README.md`` (:mod:`dpp_surgery.zoo.run`).
"""
from .registry import (
    Recipe, RecipeError, RecipeWarning, create_zoo_model, default_zoo_dir, get_recipe, list_recipes, load_recipe,
    load_recipes, register_recipe, register_recipes, registered_recipes,
)

__all__ = [
    'Recipe', 'RecipeError', 'RecipeWarning', 'create_zoo_model', 'default_zoo_dir', 'get_recipe', 'list_recipes',
    'load_recipe', 'load_recipes', 'register_recipe', 'register_recipes', 'registered_recipes',
]

# timm has no plugin discovery: the zoo's <arch>_dpp models are registered on import
register_recipes()
