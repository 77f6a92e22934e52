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


def _structured_images(n: int, size: int) -> torch.Tensor:
    """uint8 (n, 3, size, size): a horizontal gradient, a 1-pixel checkerboard (which a resize without antialiasing
    aliases) and a vertical gradient with a bright square, each image shifted by its index."""
    i = torch.arange(size).view(1, size)
    j = torch.arange(size).view(size, 1)
    imgs = []
    for k in range(n):
        grad = (i * 255 // (size - 1)).expand(size, size)
        checker = ((i + j + k) % 2) * 200 + 20
        vert = (j * 180 // (size - 1)).expand(size, size).clone()
        vert[size // 4 + k:size // 2 + k, size // 3:size // 2 + 2] = 250
        imgs.append(torch.stack([grad, checker, vert]))
    return torch.stack(imgs).to(torch.uint8)


@pytest.mark.parametrize('src,size', [(28, 64), (64, 28), (40, 40)])
def test_batch_transform_resizes_and_normalises(src, size):
    """Upscaled, downscaled (where antialiasing matters: the checkerboard) and unscaled structured images against an
    independent float64 computation: [0, 1], torch's bilinear interpolation with antialiasing, then per-channel
    normalisation with distinct means and stds (a channel mix-up shows)."""
    import torch.nn.functional as F
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    images = _structured_images(2, src)
    out = BatchTransform(size, mean, std)(images)
    assert out.shape == (2, 3, size, size) and out.dtype == torch.float32
    ref = images.double() / 255
    if src != size:
        ref = F.interpolate(ref, size=(size, size), mode='bilinear', align_corners=False, antialias=True)
    ref = (ref - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(std, dtype=torch.float64
                                                                                          ).view(1, 3, 1, 1)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-5)
