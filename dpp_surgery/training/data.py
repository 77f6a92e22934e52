"""Datasets for fine-tuning: ImageFolder, CIFAR-10/100 (python format) and MNIST/Fashion-MNIST (IDX) directories.

Images come out as uint8 (C, H, W) tensors (grey images repeated to 3 channels); :class:`BatchTransform` turns a
batch into the model's input (resize, scale, normalise) on the fly, which is much faster on 2 cores than
per-image PIL transforms for these small images.
"""
from __future__ import annotations

import gzip
import os
import pickle  # noqa: S403 - CIFAR's python format is a pickle of numpy arrays; see _load_cifar
import struct
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ['DEFAULT_DATA', 'DatasetPair', 'load_datasets', 'BatchTransform', 'detect_format']

DEFAULT_DATA = '/usr/share/datasets/fashion-mnist'
_MISSING_DEFAULT = ('the default data set, Fashion-MNIST, is not installed: run '
                    '`apt-get install dataset-fashion-mnist` (Debian/Ubuntu; it puts the IDX files in '
                    f'{DEFAULT_DATA}), or pass --data with an ImageFolder, CIFAR or MNIST-style directory')
FASHION_CLASSES = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
                   'Ankle boot']


class TensorImages(Dataset):
    """uint8 images (N, C, H, W) with integer labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]):
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise ValueError(f'images must be a uint8 (N, C, H, W) tensor, but got {images.dtype} '
                             f'{tuple(images.shape)}')
        self.images, self.labels, self.classes = images, labels.long(), list(classes)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


class _Folder(Dataset):
    """torchvision ImageFolder yielding uint8 (3, H, W) tensors resized to a fixed size."""

    def __init__(self, root: str, size: int):
        from torchvision import datasets, transforms
        tf = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.PILToTensor()])
        self.inner = datasets.ImageFolder(root, transform=tf, loader=lambda p: datasets.folder.default_loader(p))
        self.classes = self.inner.classes

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        img, label = self.inner[i]
        if img.shape[0] == 1:
            img = img.expand(3, -1, -1)
        return img[:3], torch.tensor(label)


@dataclass
class DatasetPair:
    train: Dataset
    test: Dataset
    classes: List[str]
    format: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _open(path: str):
    return gzip.open(path, 'rb') if path.endswith('.gz') else open(path, 'rb')


def _find(root: str, stem: str) -> Optional[str]:
    for name in (stem, stem + '.gz', stem.replace('-idx', '.idx'), stem.replace('-idx', '.idx') + '.gz'):
        p = os.path.join(root, name)
        if os.path.isfile(p):
            return p
    return None


def _read_idx(path: str) -> np.ndarray:
    with _open(path) as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f'{path} is not an IDX file (too short)')
    zero, dtype_code, ndim = data[0:2], data[2], data[3]
    if zero != b'\x00\x00' or dtype_code != 0x08:
        raise ValueError(f'{path} is not an unsigned-byte IDX file')
    dims = struct.unpack('>' + 'I' * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f'{path} is truncated: expected {int(np.prod(dims))} values, found {arr.size}')
    return arr.reshape(dims)


def _load_idx(root: str) -> DatasetPair:
    parts = {}
    for split, prefix in (('train', 'train'), ('test', 't10k')):
        img = _find(root, f'{prefix}-images-idx3-ubyte')
        lab = _find(root, f'{prefix}-labels-idx1-ubyte')
        if img is None or lab is None:
            raise FileNotFoundError(f'{root}: missing {prefix}-images-idx3-ubyte(.gz) or '
                                    f'{prefix}-labels-idx1-ubyte(.gz)')
        images = torch.from_numpy(_read_idx(img).copy()).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
        labels = torch.from_numpy(_read_idx(lab).astype(np.int64))
        if len(images) != len(labels):
            raise ValueError(f'{root}: {len(images)} {split} images but {len(labels)} labels')
        parts[split] = (images, labels)
    n = int(parts['train'][1].max()) + 1
    classes = FASHION_CLASSES if 'fashion' in root.lower() and n == 10 else [str(i) for i in range(n)]
    return DatasetPair(TensorImages(*parts['train'], classes), TensorImages(*parts['test'], classes), classes, 'idx')


def _unpickle(path: str) -> dict:
    # CIFAR's python format is pickled numpy arrays; restrict what unpickling may build to numpy's array types
    class _Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            if module.startswith('numpy') or (module, name) == ('builtins', 'list'):
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f'{path}: refusing to load {module}.{name}')

    with open(path, 'rb') as f:
        return _Restricted(f, encoding='bytes').load()


def _load_cifar(root: str) -> DatasetPair:
    def decode(d):
        return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}

    if os.path.isfile(os.path.join(root, 'data_batch_1')):  # CIFAR-10
        train = [decode(_unpickle(os.path.join(root, f'data_batch_{i}'))) for i in range(1, 6)]
        test = decode(_unpickle(os.path.join(root, 'test_batch')))
        meta = decode(_unpickle(os.path.join(root, 'batches.meta')))
        classes = [c.decode() if isinstance(c, bytes) else c for c in meta['label_names']]
        x_tr = np.concatenate([b['data'] for b in train])
        y_tr = np.concatenate([np.asarray(b['labels']) for b in train])
        x_te, y_te = test['data'], np.asarray(test['labels'])
    else:  # CIFAR-100
        train, test = decode(_unpickle(os.path.join(root, 'train'))), decode(_unpickle(os.path.join(root, 'test')))
        meta = decode(_unpickle(os.path.join(root, 'meta')))
        classes = [c.decode() if isinstance(c, bytes) else c for c in meta['fine_label_names']]
        x_tr, y_tr = train['data'], np.asarray(train['fine_labels'])
        x_te, y_te = test['data'], np.asarray(test['fine_labels'])

    def images(x):
        return torch.from_numpy(np.ascontiguousarray(x.reshape(-1, 3, 32, 32).astype(np.uint8)))

    return DatasetPair(TensorImages(images(x_tr), torch.from_numpy(y_tr), classes),
                       TensorImages(images(x_te), torch.from_numpy(y_te), classes), classes, 'cifar')


def _load_folder(root: str, size: int) -> DatasetPair:
    train_dir = next((os.path.join(root, d) for d in ('train', 'training') if os.path.isdir(os.path.join(root, d))),
                     None)
    test_dir = next((os.path.join(root, d) for d in ('val', 'test', 'validation')
                     if os.path.isdir(os.path.join(root, d))), None)
    if train_dir is None or test_dir is None:
        raise FileNotFoundError(f'{root}: an ImageFolder data set needs train/ and val/ (or test/) subfolders with '
                                'one folder per class')
    train, test = _Folder(train_dir, size), _Folder(test_dir, size)
    if train.classes != test.classes:
        raise ValueError(f'{root}: train/ and val/ have different class folders')
    return DatasetPair(train, test, train.classes, 'imagefolder')


def detect_format(root: str) -> str:
    """'idx', 'cifar' or 'imagefolder' for a data directory, with an error saying what was expected."""
    if not os.path.isdir(root):
        if os.path.abspath(root) == DEFAULT_DATA:
            raise FileNotFoundError(_MISSING_DEFAULT)
        raise FileNotFoundError(f'data directory {root} does not exist')
    if _find(root, 'train-images-idx3-ubyte'):
        return 'idx'
    if os.path.isfile(os.path.join(root, 'data_batch_1')) or os.path.isfile(os.path.join(root, 'train')) and \
            os.path.isfile(os.path.join(root, 'meta')):
        return 'cifar'
    if any(os.path.isdir(os.path.join(root, d)) for d in ('train', 'training')):
        return 'imagefolder'
    raise ValueError(f'{root}: not a recognised data set directory. Expected an MNIST-style IDX directory '
                     '(train-images-idx3-ubyte[.gz] ...), a CIFAR-10/100 python directory (data_batch_1 ... / '
                     'train, test, meta), or an ImageFolder root with train/ and val/ class folders.')


def load_datasets(root: Optional[str] = None, image_size: int = 64) -> DatasetPair:
    """Train and test sets from ``root`` (default: Debian's Fashion-MNIST)."""
    root = root or DEFAULT_DATA
    fmt = detect_format(root)
    if fmt == 'idx':
        return _load_idx(root)
    if fmt == 'cifar':
        return _load_cifar(root)
    return _load_folder(root, image_size)


class BatchTransform:
    """uint8 (N, C, H, W) batch -> normalised float input of ``size`` x ``size`` (bilinear, antialiased)."""

    def __init__(self, size: int, mean: Tuple[float, ...], std: Tuple[float, ...], dtype=torch.float32):
        self.size, self.dtype = size, dtype
        self.mean = torch.tensor(mean, dtype=dtype).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=dtype).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.dtype) / 255.0
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode='bilinear', align_corners=False, antialias=True)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)
