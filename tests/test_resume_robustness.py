"""A damaged run folder or checkpoint fails with one line naming the file, the problem and the fix, and is left
exactly as it was: a truncated, corrupt or foreign ``train_state.pt``, NaN or wrong-dtype tensors in it, a run
folder resumed with other options (``finetune --resume``), and NaN or wrong-dtype tensors in a ``.safetensors``
(``dpp_surgery.load``)."""
import hashlib
import os
import pickle
import shutil

import pytest
import torch

import dpp_surgery
from dpp_surgery.training import data as data_mod
from dpp_surgery.checkpoint import CheckpointError
from dpp_surgery.training.finetune import STATE_FILE, finetune

needs_data = pytest.mark.skipif(not os.path.isdir(data_mod.DEFAULT_DATA),
                                reason='apt-get install dataset-fashion-mnist (CI installs it)')

# a random-init resnet10t converted with the default policy, two optimizer steps at 32 px
RUN = dict(model='resnet10t', pretrained=False, img_size=32, train_subset=32, test_subset=16, batch_size=16,
           epochs=1, progress=False, threads=2, amp=False)


def _hashes(folder) -> dict:
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, 'rb') as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope='module')
def run_folder(tmp_path_factory):
    if not os.path.isdir(data_mod.DEFAULT_DATA):
        pytest.skip('apt-get install dataset-fashion-mnist (CI installs it)')
    out = str(tmp_path_factory.mktemp('run') / 'run')
    finetune(output=out, **RUN)
    return out


@pytest.fixture
def damaged(run_folder, tmp_path):
    """A copy of the run folder to damage: ``(folder, state_path)``."""
    folder = str(tmp_path / 'run')
    shutil.copytree(run_folder, folder)
    return folder, os.path.join(folder, STATE_FILE)


def _resume_fails(folder, match, **changes):
    """--resume of ``folder`` fails with one line that matches ``match``; the folder is left as it was."""
    before = _hashes(folder)
    with pytest.raises(ValueError, match=match) as info:
        finetune(resume=folder, **dict(RUN, epochs=2, **changes))
    message = str(info.value)
    assert '\n' not in message and message.startswith('--resume')
    assert _hashes(folder) == before
    return message


def _edit_state(path, edit):
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


def _theta(state_dict) -> str:
    return next(k for k in state_dict if k.endswith('.theta_alpha'))


@needs_data
def test_resume_of_an_intact_folder_continues(damaged):
    folder, _ = damaged
    metrics = finetune(resume=folder, **dict(RUN, epochs=2))
    assert metrics['epoch'] == 2


@needs_data
@pytest.mark.parametrize('damage', ['truncated', 'garbage', 'pickle', 'empty'])
def test_unreadable_train_state(damaged, damage):
    folder, path = damaged
    with open(path, 'rb') as f:
        data = f.read()
    with open(path, 'wb') as f:
        if damage == 'truncated':
            f.write(data[:len(data) // 2])
        elif damage == 'garbage':
            f.write(bytes(range(256)) * 64)
        elif damage == 'pickle':  # a plain pickle of a class that weights_only refuses
            pickle.dump({'model': os.path.join}, f)
    message = _resume_fails(folder, r'cannot be read \(')
    assert path in message and 'truncated, corrupted or no training state' in message and '--overwrite' in message


@needs_data
def test_foreign_train_state(damaged):
    folder, path = damaged
    state = torch.load(path, weights_only=True)
    torch.save(state['model'], path)  # a model's state_dict, not a training state
    message = _resume_fails(folder, 'is no training state of dpp_surgery finetune: it lacks model, optimizer')
    assert path in message
    torch.save([1, 2, 3], path)
    _resume_fails(folder, 'it holds a list, not a dict')
    torch.save(dict(state, epoch='1'), path)
    _resume_fails(folder, 'epoch is a str')
    torch.save(dict(state, optimizer={'lr': 0.1}), path)
    _resume_fails(folder, 'optimizer is not an optimizer state_dict')
    torch.save(dict(state, rng=torch.zeros(3)), path)
    _resume_fails(folder, 'rng is a torch.float32 tensor of shape \\(3,\\), not a CPU RNG state')


@needs_data
def test_nan_theta_in_train_state(damaged):
    folder, path = damaged
    _edit_state(path, lambda s: s['model'][_theta(s['model'])].view(-1).__setitem__(0, float('nan')))
    message = _resume_fails(folder, r'theta_alpha holds NaN or inf \(1 of \d+ values\)')
    assert path in message and 'restart from an earlier copy' in message


@needs_data
def test_wrong_dtype_in_train_state(damaged):
    folder, path = damaged
    _edit_state(path, lambda s: s['model'].__setitem__(_theta(s['model']), s['model'][_theta(s['model'])].long()))
    message = _resume_fails(folder, 'theta_alpha has dtype int64, where the model has float32')
    assert path in message


@needs_data
def test_resume_with_other_options(damaged):
    folder, _ = damaged
    message = _resume_fails(folder, r'started with other options .*config.json\): placement None -> .post.; '
                                    r'img_size 32 -> 48; ', img_size=48, placement='post')
    assert 'resume with the options of' in message
    _resume_fails(folder, 'model .resnet10t. -> .resnet14t.', model='resnet14t')


def _rewrite_safetensors(src, dst, edit):
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(src, framework='pt') as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, dst, metadata=metadata)
    return dst


@needs_data
@pytest.mark.parametrize('damage', ['nan', 'inf', 'dtype', 'nan_weight'])
def test_damaged_safetensors_for_load(run_folder, tmp_path, damage):
    """``dpp_surgery.load`` of a checkpoint with a NaN or inf DPP theta, a NaN weight, or an integer theta."""
    src = os.path.join(run_folder, 'last.safetensors')
    assert dpp_surgery.load(src) is not None
    theta = _theta(dpp_surgery.load(src).state_dict())

    def edit(t):
        if damage == 'dtype':
            t[theta] = t[theta].to(torch.int32)
        elif damage == 'nan_weight':
            t['fc.weight'][0, 0] = float('nan')
        else:
            t[theta][0] = float(damage)

    path = _rewrite_safetensors(src, str(tmp_path / 'bad.safetensors'), edit)
    before = _hashes(tmp_path)
    match = {'nan': rf'{theta} holds NaN or inf \(1 of', 'inf': rf'{theta} holds NaN or inf \(1 of',
             'dtype': rf'{theta} has dtype int32, where the model has float32',
             'nan_weight': r'fc\.weight holds NaN \(1 of'}[damage]
    with pytest.raises(CheckpointError, match=match) as info:
        dpp_surgery.load(path)
    message = str(info.value)
    assert '\n' not in message and message.startswith(path) and 'load another checkpoint' in message
    assert _hashes(tmp_path) == before
