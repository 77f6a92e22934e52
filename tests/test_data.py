"""Data sets: Debian's Fashion-MNIST (real), CIFAR python format, ImageFolder, and clear errors."""
import os
import pickle

import numpy as np
import pytest
import torch

from dpp_surgery.training import data as data_mod
from dpp_surgery.training.data import BatchTransform, detect_format, load_datasets

HAS_FASHION = os.path.isdir(data_mod.DEFAULT_DATA)


@pytest.mark.skipif(not HAS_FASHION, reason='apt-get install dataset-fashion-mnist (CI installs it)')
def test_real_fashion_mnist_from_debian():
    d = load_datasets()
    assert d.format == 'idx' and len(d.train) == 60000 and len(d.test) == 10000
    assert d.classes[0] == 'T-shirt/top' and d.num_classes == 10
    img, label = d.train[0]
    assert img.shape == (3, 28, 28) and img.dtype == torch.uint8 and 0 <= int(label) < 10
    counts = torch.bincount(d.test.labels, minlength=10)
    assert (counts == 1000).all()  # Fashion-MNIST's test set is balanced


def test_missing_default_says_how_to_install(monkeypatch, tmp_path):
    missing = str(tmp_path / 'nope')
    monkeypatch.setattr(data_mod, 'DEFAULT_DATA', missing)
    with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist'):
        data_mod.detect_format(missing)


def test_unknown_directory(tmp_path):
    with pytest.raises(ValueError, match='not a recognised data set directory'):
        detect_format(str(tmp_path))
    with pytest.raises(FileNotFoundError, match='does not exist'):
        detect_format(str(tmp_path / 'x'))


def test_truncated_idx(tmp_path):
    import gzip
    import struct
    with gzip.open(tmp_path / 'train-images-idx3-ubyte.gz', 'wb') as f:
        f.write(struct.pack('>BBBBIII', 0, 0, 8, 3, 10, 28, 28) + b'\x00' * 100)
    with gzip.open(tmp_path / 'train-labels-idx1-ubyte.gz', 'wb') as f:
        f.write(struct.pack('>BBBBI', 0, 0, 8, 1, 10) + b'\x00' * 10)
    for split in ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'):
        (tmp_path / split).write_bytes((tmp_path / split.replace('t10k', 'train')).read_bytes())
    with pytest.raises(ValueError, match='truncated'):
        load_datasets(str(tmp_path))


def _write_cifar10(root):
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        batch = {b'data': rng.integers(0, 255, (20, 3072), dtype=np.uint8), b'labels': list(rng.integers(0, 10, 20))}
        with open(root / f'data_batch_{i}', 'wb') as f:
            pickle.dump(batch, f)
    with open(root / 'test_batch', 'wb') as f:
        pickle.dump({b'data': rng.integers(0, 255, (10, 3072), dtype=np.uint8), b'labels': list(range(10))}, f)
    with open(root / 'batches.meta', 'wb') as f:
        pickle.dump({b'label_names': [f'c{i}'.encode() for i in range(10)]}, f)


def test_cifar10_python_format(tmp_path):
    _write_cifar10(tmp_path)
    d = load_datasets(str(tmp_path))
    assert d.format == 'cifar' and len(d.train) == 100 and len(d.test) == 10 and d.classes[3] == 'c3'
    img, label = d.test[4]
    assert img.shape == (3, 32, 32) and int(label) == 4


def test_cifar_refuses_arbitrary_pickles(tmp_path):
    _write_cifar10(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ('true',))

    with open(tmp_path / 'test_batch', 'wb') as f:
        pickle.dump({b'data': Evil(), b'labels': []}, f)
    with pytest.raises(pickle.UnpicklingError, match='refusing to load'):
        load_datasets(str(tmp_path))


def test_image_folder(tmp_path):
    from PIL import Image
    for split in ('train', 'val'):
        for cls in ('cat', 'dog'):
            os.makedirs(tmp_path / split / cls)
            for i in range(3):
                mode = 'L' if i == 0 else 'RGB'  # grey images become 3 channels
                Image.new(mode, (40, 30), color=100 if mode == 'L' else (10, 200, 30)).save(
                    tmp_path / split / cls / f'{i}.png')
    d = load_datasets(str(tmp_path), image_size=24)
    assert d.format == 'imagefolder' and d.classes == ['cat', 'dog'] and len(d.train) == 6
    img, label = d.train[0]
    assert img.shape == (3, 24, 24) and img.dtype == torch.uint8


def test_batch_transform_resizes_and_normalises():
    t = BatchTransform(64, (0.5,) * 3, (0.5,) * 3)
    x = t(torch.full((2, 3, 28, 28), 255, dtype=torch.uint8))
    assert x.shape == (2, 3, 64, 64) and torch.allclose(x, torch.ones_like(x))
