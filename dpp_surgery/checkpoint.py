"""Checkpoints of converted models: safetensors weights plus JSON metadata, written atomically.

``save(model, path)`` stores the weights with what rebuilds the model: the timm model name and kwargs, every
conversion applied (policy and input size, in order), the input preprocessing the weights expect (mean, std, size
from ``pretrained_cfg``), and the dpp_surgery version. ``load(path)`` creates the timm
model, replays the conversions and loads the weights strictly; nothing is unpickled.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from .version import __version__

__all__ = ['save', 'load', 'read_metadata', 'create', 'CheckpointError', 'atomic_write', 'FORMAT']

FORMAT = 'dpp_surgery.checkpoint.v1'


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, not a dpp_surgery checkpoint, corrupted, or does not match its model."""


def create(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model(name, pretrained, **kwargs)`` that remembers ``name`` and ``kwargs`` for :func:`save`."""
    import timm

    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    model._dpp_surgery_create = (name, dict(kwargs))
    return model


def _model_spec(model: nn.Module) -> Tuple[str, Dict[str, Any]]:
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


_PREPROCESSING_KEYS = ('input_size', 'mean', 'std', 'interpolation', 'crop_pct', 'crop_mode')


def _preprocessing(model: nn.Module) -> Dict[str, Any]:
    cfg = getattr(model, 'pretrained_cfg', None)
    if not isinstance(cfg, dict):
        return {}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items() if k in _PREPROCESSING_KEYS}


def atomic_write(path: str, write_fn, overwrite: bool) -> None:
    """Call ``write_fn(tmp_path)`` and move the result to ``path`` atomically (never a half-written ``path``)."""
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f'{path} exists; pass overwrite=True (CLI: --overwrite) to replace it')
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=directory)
    os.close(fd)
    try:
        write_fn(tmp)
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save(model: nn.Module, path: str, overwrite: bool = False, metadata: Optional[Dict[str, Any]] = None) -> str:
    """Write ``model``'s weights and how to rebuild it to ``path`` (safetensors), atomically.

    Args:
        model: a timm model, converted or not (a DDP/DataParallel wrapper is unwrapped).
        path: destination file (``.safetensors``).
        overwrite: replace an existing file; without it an existing file is an error.
        metadata: extra JSON-serialisable entries stored under ``extra``.

    Returns:
        ``path``.
    """
    from safetensors.torch import save_file

    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    name, kwargs = _model_spec(model)
    history = getattr(model, '_dpp_surgery_history', [])
    meta = {
        'format': FORMAT,
        'dpp_surgery_version': __version__,
        'model_name': name,
        'model_kwargs': json.dumps(kwargs),
        'conversions': json.dumps([{'policy': pol.to_dict(), 'input_size': list(size)} for pol, size in history]),
        'preprocessing': json.dumps(_preprocessing(model)),
        'extra': json.dumps(metadata or {}),
    }
    # safetensors refuses shared storage; clone every tensor to a contiguous CPU copy
    tensors = {k: v.detach().to('cpu').contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta), overwrite)
    return path


def read_metadata(path: str) -> Dict[str, Any]:
    """The decoded metadata of a dpp_surgery checkpoint.

    Raises:
        CheckpointError: missing file, not safetensors (truncated, corrupted, another format), or not ours.
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
    if raw.get('format') != FORMAT:
        raise CheckpointError(f'{path} is a safetensors file but not a dpp_surgery checkpoint (no format={FORMAT!r})')
    try:
        return {
            'format': raw['format'],
            'dpp_surgery_version': raw.get('dpp_surgery_version'),
            'model_name': raw['model_name'],
            'model_kwargs': json.loads(raw['model_kwargs']),
            'conversions': json.loads(raw['conversions']),
            'preprocessing': json.loads(raw.get('preprocessing', '{}')),
            'extra': json.loads(raw.get('extra', '{}')),
        }
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f'{path} has damaged dpp_surgery metadata: {e}') from e


def _policy_from_dict(d: Dict[str, Any]):
    from .surgery import ConversionPolicy

    d = dict(d)
    leaves = d.pop('leaf_modules', []) or []
    if leaves:
        import timm.layers
        resolved = []
        for name in leaves:
            cls = getattr(torch.nn, name, None) or getattr(timm.layers, name, None)
            if cls is None:
                raise CheckpointError(f'checkpoint policy names leaf module {name!r}, which is not in torch.nn or '
                                      'timm.layers; rebuild with dpp_surgery.convert(..., leaf_modules=[...]) yourself')
            resolved.append(cls)
        d['leaf_modules'] = tuple(resolved)
    for key in ('targets', 'include', 'exclude', 'include_types', 'exclude_types'):
        if key in d and isinstance(d[key], list):
            d[key] = tuple(d[key])
    for kind in ('max_pool', 'avg_pool', 'strided_conv'):
        if kind in d and isinstance(d[kind].get('init'), list):
            d[kind] = dict(d[kind], init=tuple(d[kind]['init']))
    return ConversionPolicy(**d)


def load(path: str, map_location: str = 'cpu') -> nn.Module:
    """Rebuild the model saved by :func:`save` (create, convert with the stored policy, strict load).

    Raises:
        CheckpointError: see :func:`read_metadata`, or weights that do not match the rebuilt model.
    """
    import warnings

    from safetensors.torch import load_file

    from .surgery import NoEffectWarning, convert

    meta = read_metadata(path)
    try:
        state = load_file(path, device=str(map_location))
    except Exception as e:
        raise CheckpointError(f'{path}: cannot read its tensors (truncated or corrupted): {e}') from e
    model = create(meta['model_name'], pretrained=False, **meta['model_kwargs'])
    for step in meta['conversions']:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', NoEffectWarning)
            convert(model, input_size=step['input_size'], policy=_policy_from_dict(step['policy']))
    if meta['preprocessing'] and isinstance(getattr(model, 'pretrained_cfg', None), dict):
        # the input normalisation the weights expect (it may differ from timm's default for this architecture)
        model.pretrained_cfg = dict(model.pretrained_cfg, **{
            k: tuple(v) if isinstance(v, list) else v for k, v in meta['preprocessing'].items()})
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f'{path} does not match the rebuilt {meta["model_name"]}: {len(result.missing_keys)} missing keys '
            f'{result.missing_keys[:3]}, {len(result.unexpected_keys)} unexpected {result.unexpected_keys[:3]}')
    return model.to(map_location)
