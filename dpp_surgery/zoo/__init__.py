"""The model zoo, in one place: the recipes registered as timm models (:mod:`.registry`) and the runner
(:mod:`.runner`, ``python -m dpp_surgery.zoo {list,run,table}``). The recipes themselves are data, in the
repository's ``zoo/`` folder (installed to ``<prefix>/share/dpp_surgery/zoo``).

Every recipe ``zoo/<arch>_dpp.json`` is registered with timm as the model ``<arch>_dpp`` when :mod:`dpp_surgery` is
imported; only its name, architecture and weight source are read then, the rest is checked when a model is created
from it. The runner lists the recipes, runs one (fine-tune, accuracy, parameters, GFLOPs, latency in PyTorch and
onnxruntime) and regenerates ``zoo/README.md``.
"""
from .registry import (
    Recipe, RecipeError, RecipeWarning, create_zoo_model, default_zoo_dir, get_recipe, list_recipes, load_recipe,
    load_recipes, register_recipe, register_recipes, registered_recipes,
)

__all__ = [
    'Recipe', 'RecipeError', 'RecipeWarning', 'create_zoo_model', 'default_zoo_dir', 'get_recipe', 'list_recipes',
    'load_recipe', 'load_recipes', 'register_recipe', 'register_recipes', 'registered_recipes',
]

# timm has no plugin discovery: the zoo's <arch>_dpp models are registered on import (cheaply: see register_recipes)
register_recipes(validate=False)
