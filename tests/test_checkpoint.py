"""save/load: exact rebuild, atomic writes, clear errors for bad files."""
import json
import os
import pathlib

import pytest
import torch

import dpp_surgery
from dpp_surgery import CheckpointError, convert, create, load, save
from dpp_surgery.checkpoint import read_metadata


def _converted(name='resnet18', **policy):
    torch.manual_seed(0)
    model = create(name, num_classes=7)
    convert(model, input_size=(3, 64, 64), **policy)
    with torch.no_grad():  # make the DPP parameters differ from their init, so the round trip is meaningful
        for _, layer in dpp_surgery.dpp_layers(model):
            layer.theta_alpha.normal_()
            layer.theta_lambda.normal_(0, 0.3)
    return model.eval()


@pytest.mark.parametrize('policy', [{}, {'placement': 'post', 'max_pool': {'guide': 'full', 'reward': 'asym'}},
                                    {'placement': 'pre', 'targets': ['strided_conv']}])
def test_round_trip_rebuilds_identical_model(tmp_path, policy):
    model = _converted(**policy)
    path = save(model, str(tmp_path / 'm.safetensors'))
    meta = read_metadata(path)
    assert meta['model_name'] == 'resnet18' and meta['model_kwargs']['num_classes'] == 7
    assert len(meta['conversions']) == 1 and meta['dpp_surgery_version'] == dpp_surgery.__version__
    loaded = load(path).eval()
    assert type(loaded) is type(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert [n for n, _ in dpp_surgery.dpp_layers(loaded)] == [n for n, _ in dpp_surgery.dpp_layers(model)]


def test_two_conversions_replay_in_order(tmp_path):
    model = create('resnet18')
    convert(model, input_size=(3, 64, 64), targets=['max_pool'])
    convert(model, input_size=(3, 64, 64), targets=['strided_conv'], placement='post')
    loaded = load(save(model, str(tmp_path / 'm.safetensors')))
    assert set(loaded.state_dict()) == set(model.state_dict())


def test_unconverted_model_round_trip(tmp_path):
    model = create('resnet18').eval()
    loaded = load(save(model, str(tmp_path / 'plain.safetensors'))).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_no_overwrite_without_asking(tmp_path):
    model = _converted()
    path = str(tmp_path / 'm.safetensors')
    save(model, path)
    before = pathlib.Path(path).read_bytes()
    with pytest.raises(FileExistsError, match='exists; pass overwrite=True'):
        save(model, path)
    assert pathlib.Path(path).read_bytes() == before
    save(model, path, overwrite=True)


def test_crash_during_write_leaves_no_partial_file(tmp_path, monkeypatch):
    import safetensors.torch as st
    model = _converted()
    path = tmp_path / 'm.safetensors'
    save(model, str(path))
    good = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, 'wb') as f:
            f.write(b'partial')
        raise OSError('disk full')

    monkeypatch.setattr(st, 'save_file', crash)
    with pytest.raises(OSError, match='disk full'):
        save(model, str(path), overwrite=True)
    assert path.read_bytes() == good  # the old checkpoint is intact
    assert sorted(os.listdir(tmp_path)) == ['m.safetensors']  # and no temporary file is left


def test_truncated_file(tmp_path):
    path = save(_converted(), str(tmp_path / 'm.safetensors'))
    data = pathlib.Path(path).read_bytes()
    for cut in (4, 100, len(data) // 2):
        bad = tmp_path / f'cut{cut}.safetensors'
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match='truncated|corrupted'):
            load(str(bad))


def test_corrupted_header(tmp_path):
    path = save(_converted(), str(tmp_path / 'm.safetensors'))
    data = bytearray(pathlib.Path(path).read_bytes())
    data[10:20] = b'\xff' * 10
    bad = tmp_path / 'bad.safetensors'
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        load(str(bad))


def test_other_formats(tmp_path):
    pt = tmp_path / 'model.pt'
    torch.save(create('resnet18').state_dict(), pt)
    with pytest.raises(CheckpointError, match='not a readable safetensors file'):
        load(str(pt))
    from safetensors.torch import save_file
    plain = tmp_path / 'plain.safetensors'
    save_file({'w': torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match='not a dpp_surgery checkpoint'):
        load(str(plain))
    with pytest.raises(CheckpointError, match='does not exist'):
        load(str(tmp_path / 'missing.safetensors'))


def test_mismatching_weights(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    path = save(_converted(), str(tmp_path / 'm.safetensors'))
    with safe_open(path, framework='pt') as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta['model_name'] = 'resnet34'  # the weights are resnet18's
    save_file(tensors, str(tmp_path / 'wrong.safetensors'), metadata=meta)
    with pytest.raises(CheckpointError, match='does not match the rebuilt resnet34'):
        load(str(tmp_path / 'wrong.safetensors'))
    meta2 = dict(meta, model_name='resnet18', conversions='{not json')
    save_file(tensors, str(tmp_path / 'meta.safetensors'), metadata=meta2)
    with pytest.raises(CheckpointError, match='damaged dpp_surgery metadata'):
        load(str(tmp_path / 'meta.safetensors'))


def test_nothing_is_unpickled(tmp_path, monkeypatch):
    import pickle
    path = save(_converted(), str(tmp_path / 'm.safetensors'))

    def forbidden(*a, **k):
        raise AssertionError('load() must not unpickle')

    monkeypatch.setattr(pickle, 'load', forbidden)
    monkeypatch.setattr(pickle, 'loads', forbidden)
    monkeypatch.setattr(torch, 'load', forbidden)
    load(path)
    assert json.loads(json.dumps(read_metadata(path)))['model_name'] == 'resnet18'
