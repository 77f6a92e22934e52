"""Checkpoints of converted models: safetensors weights plus JSON metadata, written atomically.

``save(model, path)`` stores the weights with what rebuilds the model: the timm model name and kwargs, every
conversion applied (policy and input size, in order), the input preprocessing the weights expect (mean, std, size
from ``pretrained_cfg``), and the dpp_surgery version. ``load(path)`` creates the timm
model, replays the conversions and loads the weights strictly; nothing is unpickled.

A checkpoint is data, never instructions: :func:`read_metadata` (and so :func:`load`) checks every metadata field
before anything is built. The model name must be one that timm lists; the model kwargs come from a fixed allowlist
(:data:`MODEL_KWARGS`) with type and range checks, so a file cannot name a file, URL, hub, layer class or callable;
policies, input sizes (:func:`validate_input_size`), the number of conversions and the preprocessing are bounded
by the constants below. :func:`save` applies the same checks, so it never writes a file that ``load`` refuses.
"""
from __future__ import annotations

import json
import os
import re
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .utils import atomic_write, did_you_mean, first_line
from .utils import is_finite_number as _is_number, is_int as _is_int, short_repr as _short
from .utils import MAX_LIST_ENTRIES, MAX_NAME_LENGTH, field_path as _field, one_of as _choice
from .surgery.policy import policy_from_dict

MAX_POLICY_ENTRIES = MAX_LIST_ENTRIES  # entries of a policy's list fields (include, exclude, include_types, ...)
from .version import __version__

if TYPE_CHECKING:
    from .surgery import ConversionPolicy

__all__ = [
    'save', 'load', 'read_metadata', 'read_conversions', 'read_tensors', 'create', 'record_creation', 'rebuild', 'CheckpointError',
    'check_tensor_values',
    'FORMAT', 'validate_input_size',
    'validate_image_size', 'validate_policy', 'MODEL_KWARGS', 'MAX_CHANNELS', 'MAX_IMAGE_SIDE', 'MAX_CONVERSIONS',
    'MAX_NUM_CLASSES',
]

FORMAT_VERSION = 1
FORMAT = f'dpp_surgery.checkpoint.v{FORMAT_VERSION}'
_FORMAT_PATTERN = re.compile(r'dpp_surgery\.checkpoint\.v(\d{1,6})')

# bounds on what a checkpoint or a zoo recipe may ask for (the same wherever a size comes from a file or a recipe)
MAX_CHANNELS = 16  # input channels (in_chans, the C of an input size, the length of mean/std)
MAX_IMAGE_SIDE = 1024  # pixels, for the H and W of an input size and for an image size
MAX_CONVERSIONS = 16  # conversions replayed by load
MAX_NUM_CLASSES = 100_000

# timm's global pooling types (SelectAdaptivePool2d and the transformers' token/map pooling); '' = no pooling
GLOBAL_POOLS = ('', 'avg', 'max', 'avgmax', 'catavgmax', 'fast', 'fastavg', 'fastmax', 'fastavgmax', 'fastcatavgmax',
                'token', 'map')
OUTPUT_STRIDES = (8, 16, 32)
INTERPOLATIONS = ('nearest', 'bilinear', 'bicubic', 'box', 'hamming', 'lanczos', 'random')
CROP_MODES = ('center', 'squash', 'border')
# top-level metadata entries: required, then optional
_REQUIRED_META = ('format', 'model_name', 'model_kwargs', 'conversions')
_OPTIONAL_META = ('dpp_surgery_version', 'preprocessing', 'extra')
_PREPROCESSING_KEYS = ('input_size', 'mean', 'std', 'interpolation', 'crop_pct', 'crop_mode')
_MODEL_NAME = re.compile(r'[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?')  # timm 'arch' or 'arch.tag': no path, URL or hub prefix


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, not a dpp_surgery checkpoint, corrupted, asks for something it may not, or does
    not match its model."""


def _int_in(low: int, high: int) -> Callable[[Any], bool]:
    return lambda v: _is_int(v) and low <= v <= high


def _rate(value: Any) -> bool:
    return _is_number(value) and 0 <= value < 1


def _img_size(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return len(value) == 2 and all(_is_int(v) and 1 <= v <= MAX_IMAGE_SIDE for v in value)
    return _is_int(value) and 1 <= value <= MAX_IMAGE_SIDE


# model kwarg -> (check, what is allowed). Nothing that names a file, a URL, a hub, a layer class or a callable:
# checkpoint_path, pretrained_cfg(_overlay), cache_dir, act_layer, norm_layer, ... are refused. None (null) is the
# architecture's default, as timm.create_model drops None kwargs.
_MODEL_KWARG_CHECKS: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    'num_classes': (_int_in(0, MAX_NUM_CLASSES), f'an integer from 0 to {MAX_NUM_CLASSES}'),
    'in_chans': (_int_in(1, MAX_CHANNELS), f'an integer from 1 to {MAX_CHANNELS}'),
    'drop_rate': (_rate, 'a number in [0, 1)'),
    'drop_path_rate': (_rate, 'a number in [0, 1)'),
    'drop_block_rate': (_rate, 'a number in [0, 1)'),
    'global_pool': (lambda v: isinstance(v, str) and v in GLOBAL_POOLS, 'one of ' + ', '.join(map(repr, GLOBAL_POOLS))),
    'output_stride': (lambda v: _is_int(v) and v in OUTPUT_STRIDES, 'one of ' + ', '.join(map(str, OUTPUT_STRIDES))),
    'img_size': (_img_size, f'an integer or a pair of integers from 1 to {MAX_IMAGE_SIDE} (pixels)'),
}
# the model kwargs a checkpoint may hold, with what each allows
MODEL_KWARGS: Dict[str, str] = {k: allowed for k, (_, allowed) in _MODEL_KWARG_CHECKS.items()}


def validate_input_size(size: Any, field: str = 'input_size') -> Tuple[int, int, int]:
    """An input size ``(C, H, W)`` read from a file or a recipe, checked against the bounds.

    Args:
        size: 3 integers: 1 to :data:`MAX_CHANNELS` channels, a height and width of 1 to :data:`MAX_IMAGE_SIDE`
            pixels.
        field: the name of the field it came from, for the error message.

    Returns:
        ``size`` as a tuple.

    Raises:
        ValueError: naming the field, the value and what is allowed.
    """
    if (isinstance(size, (list, tuple)) and len(size) == 3 and all(_is_int(v) for v in size)
            and 1 <= size[0] <= MAX_CHANNELS and all(1 <= v <= MAX_IMAGE_SIDE for v in size[1:])):
        return int(size[0]), int(size[1]), int(size[2])
    raise ValueError(f'{field} must be 3 integers [channels, height, width] with 1 to {MAX_CHANNELS} channels and 1 '
                     f'to {MAX_IMAGE_SIDE} pixels per side, but got {_short(size)}')


def validate_image_size(side: Any, field: str = 'image_size') -> int:
    """An image size in pixels (one side of a square image) read from a file or a recipe: an integer from 1 to
    :data:`MAX_IMAGE_SIDE`, the bound of :func:`validate_input_size`.

    Raises:
        ValueError: naming the field, the value and what is allowed.
    """
    if _is_int(side) and 1 <= side <= MAX_IMAGE_SIDE:
        return int(side)
    raise ValueError(f'{field} must be an integer from 1 to {MAX_IMAGE_SIDE} (pixels), but got {_short(side)}')


def validate_policy(data: Any, field: str = 'policy') -> 'ConversionPolicy':
    """The :class:`~dpp_surgery.ConversionPolicy` described by ``data`` (:meth:`ConversionPolicy.from_dict
    <dpp_surgery.ConversionPolicy.from_dict>`, which checkpoints and zoo recipes both go through).

    Raises:
        ValueError: naming the field, the value and what is allowed.
    """
    return policy_from_dict(data, field)


def _check_model_name(name: Any) -> str:
    import timm
    from timm.models import get_pretrained_cfg

    if not isinstance(name, str) or len(name) > MAX_NAME_LENGTH or not _MODEL_NAME.fullmatch(name):
        raise ValueError(f'model_name must be a timm model name (letters, digits and _, an optional .tag; no path, '
                         f'URL or hub prefix), but got {_short(name)}')
    arch, _, tag = name.partition('.')
    if not timm.is_model(arch):
        hint = did_you_mean(arch, timm.list_models())
        raise ValueError(f'model_name {_short(name)} is not a timm model{hint}; allowed: a name from '
                         f'timm.list_models() (timm {timm.__version__})')
    if tag:
        try:
            known = get_pretrained_cfg(name, allow_unregistered=False) is not None
        except RuntimeError:  # timm: invalid pretrained tag
            known = False
        if not known:
            raise ValueError(f'model_name {_short(name)}: {tag!r} is not a pretrained tag of {arch}; allowed: {arch!r} '
                             f'or a name from timm.list_pretrained({arch + ".*"!r})')
    return name


def _check_model_kwargs(kwargs: Any) -> Dict[str, Any]:
    if not isinstance(kwargs, dict):
        raise ValueError(f'model_kwargs must be an object of model kwargs, but got {_short(kwargs)}')
    out = {}
    for key, value in kwargs.items():
        where = _field('model_kwargs', key)
        if key not in _MODEL_KWARG_CHECKS:
            raise ValueError(f'{where} is not an allowed model kwarg (got {_short(value)}); allowed: '
                             f'{", ".join(MODEL_KWARGS)} (a checkpoint never names files, URLs, hubs, layer classes '
                             'or callables)')
        check, allowed = _MODEL_KWARG_CHECKS[key]
        if value is None:
            continue  # the architecture's default (timm.create_model drops None kwargs)
        if not check(value):
            raise ValueError(f'{where} must be {allowed}, but got {_short(value)}')
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


# a conversion to replay: the policy and the input size it was applied with (as ``model._dpp_surgery_history``)
Conversion = Tuple['ConversionPolicy', Tuple[int, int, int]]


def _check_conversions(conversions: Any) -> Tuple[List[Dict[str, Any]], List[Conversion]]:
    """The conversions as JSON values, and as (policy, input size) pairs: every policy is checked (and built) once."""
    if not isinstance(conversions, list):
        raise ValueError(f'conversions must be a list of {{"policy", "input_size"}} objects, but got '
                         f'{_short(conversions)}')
    if len(conversions) > MAX_CONVERSIONS:
        raise ValueError(f'conversions holds {len(conversions)} conversions; allowed: at most {MAX_CONVERSIONS}')
    out, replay = [], []
    for i, step in enumerate(conversions):
        where = f'conversions[{i}]'
        if not isinstance(step, dict) or set(step) != {'policy', 'input_size'}:
            got = sorted(map(str, step)) if isinstance(step, dict) else step
            raise ValueError(f'{where} must be an object with exactly "policy" and "input_size", but got {_short(got)}')
        policy = validate_policy(step['policy'], f'{where}.policy')
        size = validate_input_size(step['input_size'], f'{where}.input_size')
        out.append({'policy': step['policy'], 'input_size': list(size)})
        replay.append((policy, size))
    return out, replay


def _channels(value: Any, field: str, positive: bool) -> List[float]:
    if (isinstance(value, (list, tuple)) and 1 <= len(value) <= MAX_CHANNELS
            and all(_is_number(v) and (v > 0 or not positive) for v in value)):
        return [float(v) for v in value]
    kind = 'positive finite numbers' if positive else 'finite numbers'
    raise ValueError(f'{field} must be a list of 1 to {MAX_CHANNELS} {kind} (one per channel), but got '
                     f'{_short(value)}')


def _check_preprocessing(pre: Any) -> Dict[str, Any]:
    if not isinstance(pre, dict):
        raise ValueError(f'preprocessing must be an object with some of {", ".join(_PREPROCESSING_KEYS)}, but got '
                         f'{_short(pre)}')
    out: Dict[str, Any] = {}
    for key, value in pre.items():
        where = _field('preprocessing', key)
        if key not in _PREPROCESSING_KEYS:
            raise ValueError(f'preprocessing has unknown entry {_short(key)}; allowed: '
                             f'{", ".join(_PREPROCESSING_KEYS)}')
        if value is None:
            continue  # unset in the model's pretrained_cfg
        if key == 'input_size':
            out[key] = list(validate_input_size(value, where))
        elif key in ('mean', 'std'):
            out[key] = _channels(value, where, positive=key == 'std')
        elif key == 'interpolation':
            out[key] = _choice(value, where, INTERPOLATIONS)
        elif key == 'crop_mode':
            out[key] = _choice(value, where, CROP_MODES)
        elif key == 'crop_pct':
            if not (_is_number(value) and 0 < value <= 2):
                raise ValueError(f'{where} must be a number in (0, 2], but got {_short(value)}')
            out[key] = value
    channels = {k: len(out[k]) for k in ('mean', 'std') if k in out}
    if 'input_size' in out:
        channels['input_size'] = out['input_size'][0]
    if len(set(channels.values())) > 1:
        detail = ', '.join(f'{k} {n}' for k, n in channels.items())
        raise ValueError(f'preprocessing: mean, std and input_size must have the same channel count, but got {detail}')
    return out


def _check_format(fmt: Any, path: str) -> None:
    if fmt == FORMAT:
        return
    match = _FORMAT_PATTERN.fullmatch(fmt) if isinstance(fmt, str) else None
    if match and int(match.group(1)) > FORMAT_VERSION:
        raise CheckpointError(f'{path} was written by a newer dpp_surgery (format {fmt!r}; this dpp_surgery '
                              f'{__version__} reads {FORMAT!r}): upgrade dpp_surgery to load it')
    if isinstance(fmt, str) and fmt.startswith('dpp_surgery.checkpoint.'):
        raise CheckpointError(f'{path}: unknown dpp_surgery checkpoint format {_short(fmt)}; this dpp_surgery '
                              f'{__version__} reads {FORMAT!r}')
    raise CheckpointError(f'{path} is a safetensors file but not a dpp_surgery checkpoint (no format={FORMAT!r})')


def _json(raw: Dict[str, str], key: str, default: str) -> Any:
    text = raw.get(key, default)
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f'damaged dpp_surgery metadata: {key} is nested too deeply to read; allowed: JSON nested '
                         'less than a few hundred levels') from None
    except (TypeError, ValueError) as e:  # json.JSONDecodeError, ints of more digits than Python converts
        raise ValueError(f'damaged dpp_surgery metadata: {key} is not valid JSON ({first_line(e)})') from e


def _validate_metadata(raw: Dict[str, Any]) -> Tuple[Dict[str, Any], List[Conversion]]:
    """The decoded metadata, every field checked (the format is checked before, by :func:`_check_format`), and its
    conversions as (policy, input size) pairs.

    Raises:
        ValueError: naming the field, the value and what is allowed.
    """
    unknown = [k for k in raw if k not in _REQUIRED_META + _OPTIONAL_META]
    if unknown:
        raise ValueError(f'unknown metadata entry {_short(unknown[0])}; a {FORMAT} checkpoint has '
                         f'{", ".join(_REQUIRED_META + _OPTIONAL_META)}')
    missing = [k for k in _REQUIRED_META if k not in raw]
    if missing:
        raise ValueError(f'damaged dpp_surgery metadata: no {missing[0]!r} entry; a checkpoint has '
                         f'{", ".join(_REQUIRED_META)} (and optionally {", ".join(_OPTIONAL_META)})')
    version = raw.get('dpp_surgery_version')
    if version is not None and (not isinstance(version, str) or len(version) > MAX_NAME_LENGTH):
        raise ValueError(f'dpp_surgery_version must be a version string of at most {MAX_NAME_LENGTH} characters, but '
                         f'got {_short(version)}')
    name = _check_model_name(raw['model_name'])
    kwargs = _check_model_kwargs(_json(raw, 'model_kwargs', '{}'))
    conversions, replay = _check_conversions(_json(raw, 'conversions', '[]'))
    preprocessing = _check_preprocessing(_json(raw, 'preprocessing', '{}'))
    extra = _json(raw, 'extra', '{}')
    if not isinstance(extra, dict):
        raise ValueError(f'extra must be a JSON object, but got {_short(extra)}')
    meta = {'format': raw['format'], 'dpp_surgery_version': version, 'model_name': name, 'model_kwargs': kwargs,
            'conversions': conversions, 'preprocessing': preprocessing, 'extra': extra}
    return meta, replay


def create(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model(name, pretrained, **kwargs)`` that remembers ``name`` and ``kwargs`` for :func:`save`."""
    import timm

    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    return record_creation(model, name, kwargs)


def record_creation(model: nn.Module, name: str, kwargs: Optional[Dict[str, Any]] = None) -> nn.Module:
    """Remember that ``model`` was built as ``timm.create_model(name, **kwargs)``, so that :func:`save` can record
    how to rebuild it (the class count is read from the model itself when it is saved).

    Args:
        model: the model, as created (before or after conversion: conversions are recorded separately).
        name: the timm model name.
        kwargs: the model kwargs it was created with (copied; default none).

    Returns:
        ``model``.
    """
    model._dpp_surgery_create = (name, dict(kwargs or {}))
    return model


def _model_spec(model: nn.Module) -> Tuple[str, Dict[str, Any]]:
    """The timm name and kwargs that rebuild ``model``: what :func:`record_creation` recorded, else the
    architecture of its ``pretrained_cfg``; with its class count."""
    spec = getattr(model, '_dpp_surgery_create', None)
    if spec is not None:
        name, kwargs = spec
        kwargs = dict(kwargs)
    else:
        cfg = getattr(model, 'pretrained_cfg', None)
        name = cfg.get('architecture') if isinstance(cfg, dict) else None
        if not name:
            raise CheckpointError(
                f'cannot tell which timm model {type(model).__name__} is: create it with dpp_surgery.create(name, ...) '
                'or timm.create_model so that save() can record how to rebuild it')
        kwargs = {}
    num_classes = getattr(model, 'num_classes', None)
    if num_classes is not None:
        kwargs['num_classes'] = int(num_classes)
    return name, kwargs


def _preprocessing(model: nn.Module) -> Dict[str, Any]:
    cfg = getattr(model, 'pretrained_cfg', None)
    if not isinstance(cfg, dict):
        return {}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()
            if k in _PREPROCESSING_KEYS and v is not None}


def _check_dpp_from_conversions(model: nn.Module, history: list, name: str, path: str) -> None:
    """Refuse DPP layers that no recorded conversion placed (a model built with timm's ``aa_layer=DPP2d``, or DPP2d
    put in by hand): :func:`load` rebuilds a model by name and replays its conversions, so it could not rebuild them.
    Conversions never fill timm's ``aa`` slot, so a DPP layer there is one of those too."""
    from .layers import DPP2d

    layers = [n for n, m in model.named_modules() if isinstance(m, DPP2d)]
    foreign = layers if not history else [n for n in layers if n.rpartition('.')[2] == 'aa']
    if foreign:
        raise CheckpointError(
            f'cannot save {name} to {path}: {len(foreign)} DPP layers ({", ".join(foreign[:3])}'
            f'{", ..." if len(foreign) > 3 else ""}) were not placed by dpp_surgery.convert (for example built through '
            "timm's aa_layer=DPP2d), and load() rebuilds a model from its name and its conversions only. Save the "
            'state_dict instead (safetensors.torch.save_file(model.state_dict(), path)) and load it into the model '
            'built the same way (timm.create_model(name, aa_layer=...))')


def save(model: nn.Module, path: str, overwrite: bool = False, metadata: Optional[Dict[str, Any]] = None) -> str:
    """Write ``model``'s weights and how to rebuild it to ``path`` (safetensors), atomically.

    Args:
        model: a timm model, converted or not (a DDP/DataParallel wrapper is unwrapped).
        path: destination file (``.safetensors``).
        overwrite: replace an existing file; without it an existing file is an error.
        metadata: extra JSON-serialisable entries stored under ``extra``.

    Returns:
        ``path``.

    Raises:
        CheckpointError: the model cannot be described by a checkpoint that :func:`load` accepts (model kwargs
            outside :data:`MODEL_KWARGS`, more than :data:`MAX_CONVERSIONS` conversions, an input size beyond the
            bounds, ...); the message names the field and what is allowed.
    """
    from safetensors.torch import save_file

    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    if hasattr(model, 'feature_info') and not hasattr(model, 'forward_head'):
        # a features_only extractor: load() rebuilds classification models from their name and kwargs
        raise CheckpointError(
            f'cannot save {type(model).__name__}, a features_only extractor, to {path}: save the converted model it '
            'was built from and build the extractor again with timm.create_model(..., features_only=True) (zoo '
            'models: pretrained_cfg_overlay=dict(file=...)), or save its state_dict with safetensors')
    name, kwargs = _model_spec(model)
    from .surgery import conversion_history

    history = conversion_history(model)
    _check_dpp_from_conversions(model, history, name, path)
    try:
        _check_model_kwargs(kwargs)  # before JSON: a layer class or a callable is refused by name, not by json
        meta = {
            'format': FORMAT,
            'dpp_surgery_version': __version__,
            'model_name': name,
            'model_kwargs': json.dumps(kwargs),
            'conversions': json.dumps([{'policy': pol.to_dict(), 'input_size': list(size)} for pol, size in history]),
            'preprocessing': json.dumps(_preprocessing(model)),
            'extra': json.dumps(metadata or {}),
        }
        _validate_metadata(meta)  # what load() checks: never write a file that load() refuses
    except (TypeError, ValueError) as e:
        raise CheckpointError(f'cannot save {name} to {path}: {first_line(e)}') from e
    # safetensors refuses shared storage; clone every tensor to a contiguous CPU copy
    tensors = {k: v.detach().to('cpu').contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta), overwrite)
    return path


def read_metadata(path: str) -> Dict[str, Any]:
    """The decoded metadata of a dpp_surgery checkpoint, every field checked (see the module docstring).

    Raises:
        CheckpointError: missing file, not safetensors (truncated, corrupted, another format), not ours, written by
            a newer dpp_surgery, or a field that is malformed or asks for what a checkpoint may not (the message
            names the field, the value and what is allowed).
    """
    return read_conversions(path)[0]


def read_conversions(path: str) -> Tuple[Dict[str, Any], List[Conversion]]:
    """:func:`read_metadata`, and the checkpoint's conversions ready for :func:`rebuild`: ``(policy, input_size)``
    pairs, in the order they were applied, every policy checked and built once.

    Raises:
        CheckpointError: as :func:`read_metadata`.
    """
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint {path} does not exist')
    try:
        with safe_open(path, framework='pt') as f:
            raw = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f'{path} is not a readable safetensors file (truncated, corrupted or another format): '
                              f'{e}') from e
    _check_format(raw.get('format'), path)
    try:
        return _validate_metadata(raw)
    except ValueError as e:
        raise CheckpointError(f'{path}: {e}') from e


def read_tensors(path: str, device: str = 'cpu') -> Dict[str, torch.Tensor]:
    """The tensors of the checkpoint ``path`` on ``device``; CheckpointError if they cannot be read (truncated or
    corrupted)."""
    from safetensors.torch import load_file

    try:
        return load_file(path, device=str(device))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f'{path}: cannot read its tensors (truncated or corrupted): {e}') from e


# DPP's parameters: they train from finite log-values, so inf there (as NaN anywhere) marks a run that diverged
_DPP_SUFFIXES = ('.theta_alpha', '.theta_lambda', '.guide_weight')


def check_tensor_values(state: Dict[str, Any], reference: Dict[str, torch.Tensor], where: str, fix: str) -> None:
    """CheckpointError, one line naming ``where``, the tensor and the problem, then ``fix``, if a tensor of ``state``
    cannot stand for its namesake in ``reference`` (a model's ``state_dict``) although its shape may fit:
    not a tensor; another kind of dtype (a float where the model has an integer buffer, an integer or bool where it
    has a float; float precisions convert); NaN anywhere, or inf in a DPP parameter (theta, guide). Keys that
    ``reference`` lacks are left to the caller's key check. Reads only."""
    for key, value in state.items():
        ref = reference.get(key)
        if ref is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f'{where}: {key} is a {type(value).__name__}, not a tensor; {fix}')
        if value.is_floating_point() != ref.is_floating_point() or (
                not ref.is_floating_point() and value.dtype != ref.dtype):
            raise CheckpointError(f'{where}: tensor {key} has dtype {str(value.dtype).replace("torch.", "")}, where '
                                  f'the model has {str(ref.dtype).replace("torch.", "")}; {fix}')
        if value.is_floating_point() and value.numel():
            bad = ~torch.isfinite(value) if key.endswith(_DPP_SUFFIXES) else torch.isnan(value)
            count = int(bad.sum())
            if count:
                what = 'NaN or inf' if key.endswith(_DPP_SUFFIXES) else 'NaN'
                raise CheckpointError(f'{where}: tensor {key} holds {what} ({count} of {value.numel()} values); {fix}')


def rebuild(model_name: str, model_kwargs: Dict[str, Any], conversions: Sequence[Conversion],
            state: Dict[str, torch.Tensor], where: str, label: Optional[str] = None) -> nn.Module:
    """The model a checkpoint describes: :func:`create` ``(model_name, **model_kwargs)``, the conversions replayed
    in order, then ``state`` loaded strictly.

    Args:
        model_name: the timm model name.
        model_kwargs: its model kwargs (checked already, or the caller's own).
        conversions: ``(policy, input_size)`` pairs, as :func:`read_conversions` returns them. A conversion that
            finds nothing to convert (a zoo model's entry point already applied it) is not warned about.
        state: the weights.
        where: where the weights come from (a file name), for error messages.
        label: the model's name in error messages (default ``model_name``).

    Returns:
        The rebuilt model, with the weights of ``state``.

    Raises:
        CheckpointError: ``state`` does not match the rebuilt model: the message names ``where``, ``label`` and the
            missing and unexpected keys, or the tensor of another shape. Errors creating or converting the model are
            raised as they are (:func:`load` explains them as a checkpoint error).
    """
    import warnings

    from .surgery import NoEffectWarning, convert

    model = create(model_name, pretrained=False, **model_kwargs)
    for policy, input_size in conversions:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', NoEffectWarning)
            convert(model, input_size=input_size, policy=policy)
    label = label or model_name
    check_tensor_values(state, model.state_dict(), where,
                        'the run that saved it went wrong (diverged, or wrote another model); load another '
                        'checkpoint of it (best.safetensors), or save the model again')
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of another shape
        detail = ' '.join(str(e).split())[:300]
        raise CheckpointError(f'{where} does not match the rebuilt {label}: {detail}') from e
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f'{where} does not match the rebuilt {label}: {len(result.missing_keys)} missing keys '
            f'{result.missing_keys[:3]}, {len(result.unexpected_keys)} unexpected {result.unexpected_keys[:3]}')
    return model


def load(path: str, map_location: str = 'cpu') -> nn.Module:
    """Rebuild the model saved by :func:`save` (create, convert with the stored policy, strict load).

    The metadata is checked first (:func:`read_metadata`); nothing is built, and no file other than ``path`` is
    read, for a checkpoint that fails the checks.

    Raises:
        CheckpointError: see :func:`read_metadata`, or weights that do not match the rebuilt model (missing or
            unexpected keys, shapes, dtypes, NaN values or non-finite DPP parameters: :func:`check_tensor_values`).
    """
    meta, conversions = read_conversions(path)
    state = read_tensors(path, map_location)
    try:
        model = rebuild(meta['model_name'], meta['model_kwargs'], conversions, state, path)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. conversion input channels that the model does not take
        raise CheckpointError(f'{path}: cannot rebuild {meta["model_name"]} from its metadata '
                              f'({type(e).__name__}: {first_line(e)})') from e
    if meta['preprocessing'] and isinstance(getattr(model, 'pretrained_cfg', None), dict):
        # the input normalisation the weights expect (it may differ from timm's default for this architecture)
        model.pretrained_cfg = dict(model.pretrained_cfg, **{
            k: tuple(v) if isinstance(v, list) else v for k, v in meta['preprocessing'].items()})
    return model.to(map_location)
