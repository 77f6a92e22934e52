"""The dpp-surgery command: every subcommand's --help, real runs, and one-line errors with non-zero exit codes."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest

from dpp_surgery import cli
from dpp_surgery.training import data as data_mod
from dpp_surgery.training.finetune import FinetuneConfig

ENV = dict(os.environ, HF_HUB_OFFLINE='1')


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, '-m', 'dpp_surgery', *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def test_help_explains_every_flag(capsys):
    for command in ('plan', 'convert', 'finetune', 'eval'):
        with pytest.raises(SystemExit) as e:
            cli.main([command, '--help'])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert 'usage: dpp-surgery ' + command in text
    with pytest.raises(SystemExit):
        cli.main(['finetune', '--help'])
    text = capsys.readouterr().out
    for f in dataclasses.fields(FinetuneConfig):
        assert '--' + f.name.replace('_', '-') in text, f.name
    assert text.count('(default:') >= len(dataclasses.fields(FinetuneConfig)) - 3


def test_plan_command(capsys, tmp_path):
    assert cli.main(['plan', 'resnet18', '--input-size', '3', '64', '64', '--json', str(tmp_path / 'p.json')]) == 0
    out = capsys.readouterr().out
    assert 'layer2.0.conv1' in out and 'replace' in out and 'stem conv' in out
    assert json.loads((tmp_path / 'p.json').read_text())['counts']['replace'] == 7


def test_convert_command_writes_a_loadable_checkpoint(tmp_path, capsys, monkeypatch):
    import importlib
    convert_module = importlib.import_module('dpp_surgery.surgery.convert')

    def no_second_plan(*args, **kwargs):
        raise AssertionError('convert planned again instead of applying the printed plan')
    monkeypatch.setattr(convert_module, 'make_plan', no_second_plan)
    path = str(tmp_path / 'r18.safetensors')
    assert cli.main(['convert', 'resnet18', '--pretrained', 'none', '--placement', 'post', '--input-size', '3', '64',
                     '64', '-o', path]) == 0
    monkeypatch.undo()  # load() replays the conversion, which plans
    import dpp_surgery
    model = dpp_surgery.load(path)
    assert hasattr(model.layer2[0].conv1, 'dpp')
    assert cli.main(['convert', 'resnet18', '--pretrained', 'none', '-o', path]) == 1  # exists, no --overwrite
    assert 'exists; pass overwrite=True' in capsys.readouterr().err


@pytest.mark.parametrize('args,message', [
    (['finetune', '--data', '/nonexistent/data'], 'data directory /nonexistent/data does not exist'),
    (['plan', 'no_such_model'], 'Unknown model'),
    (['convert', 'resnet18', '--pretrained', 'timm', '-o', 'x.safetensors'], 'cannot download pretrained weights'),
    (['finetune', '--model', 'resnet18', '--pretrained', 'offline'], 'offline has weights for efficientnet_lite0 only'),
    (['eval', '/nonexistent.safetensors'], 'does not exist'),
    (['finetune', '--epochs', '0'], 'epochs must be >= 1'),
])
def test_errors_are_one_line(args, message):
    res = _run(*args)
    assert res.returncode == 1
    err = res.stderr.strip().splitlines()
    assert err[-1].startswith('dpp-surgery: error:') and message in err[-1], res.stderr[-1500:]
    assert 'Traceback' not in res.stderr


def _crafted_checkpoint(path, **changes):
    """A safetensors file with dpp_surgery metadata that a checkpoint may not hold (see tests/test_checkpoint.py)."""
    import torch
    from safetensors.torch import save_file

    from dpp_surgery.training.checkpoint import FORMAT
    meta = dict({'format': FORMAT, 'model_name': 'resnet18', 'model_kwargs': '{}', 'conversions': '[]'}, **changes)
    save_file({'w': torch.zeros(1)}, str(path), metadata=meta)
    return str(path)


@pytest.mark.parametrize('command, changes, message', [
    ('eval', {'model_kwargs': json.dumps({'checkpoint_path': '/etc/passwd'})},
     "model_kwargs.checkpoint_path is not an allowed model kwarg (got '/etc/passwd'); allowed: num_classes"),
    ('export', {'format': 'dpp_surgery.checkpoint.v2'}, 'was written by a newer dpp_surgery'),
])
def test_crafted_checkpoint_is_a_one_line_error(tmp_path, command, changes, message):
    path = _crafted_checkpoint(tmp_path / 'crafted.safetensors', **changes)
    onnx = tmp_path / 'out.onnx'
    res = _run(command, path, *(['-o', str(onnx)] if command == 'export' else []))
    assert res.returncode == 1
    err = res.stderr.strip().splitlines()
    assert err[-1].startswith(f'dpp-surgery: error: {path}') and message in err[-1], res.stderr[-1500:]
    assert 'Traceback' not in res.stderr and not onnx.exists()


def test_crafted_checkpoint_as_pretrained_file_is_a_one_line_error(tmp_path, capsys):
    path = _crafted_checkpoint(tmp_path / 'crafted.safetensors',
                               conversions=json.dumps([{'policy': {}, 'input_size': [3, 12000, 12000]}]))
    out = tmp_path / 'converted.safetensors'
    assert cli.main(['convert', 'resnet18_dpp', '--pretrained-file', path, '-o', str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith('dpp-surgery: error:') and '\n' not in err, err
    assert 'conversions[0].input_size must be 3 integers' in err and not out.exists()


def test_unknown_flag_exits_with_usage():
    res = _run('finetune', '--epoch', '1')
    assert res.returncode == 2 and 'unrecognized arguments' in res.stderr


@pytest.mark.skipif(not os.path.isdir(data_mod.DEFAULT_DATA), reason='apt-get install dataset-fashion-mnist')
def test_finetune_then_eval(tmp_path):
    out = str(tmp_path / 'run')
    res = _run('finetune', '--output', out, '--train-subset', '64', '--test-subset', '32', '--epochs', '1',
               '--image-size', '32', '--batch-size', '16', '--no-progress', '--amp', 'none')
    assert res.returncode == 0, res.stderr[-2000:]
    final = json.loads(res.stdout.strip().splitlines()[-1])
    assert 0 <= final['test_accuracy'] <= 1
    res = _run('eval', os.path.join(out, 'best.safetensors'), '--image-size', '32', '--test-subset', '32')
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result['count'] == 32 and result['accuracy'] == final['best_test_accuracy']  # same images, float32
