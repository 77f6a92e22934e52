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
        for flag in cli._FINETUNE_FLAGS.get(f.name, ['--' + f.name.replace('_', '-')]):
            assert flag in text, f.name
    # every flag's help names its default, and where the default comes from
    assert text.count('(default') >= len(dataclasses.fields(FinetuneConfig))
    assert text.count('as in the measured runs') >= 8 and 'default 0.02' in text and 'default 10' in text
    for old in ('--ema ', '--label-smoothing', '--accum-steps', '--num-workers', '--pretrained-file', '--image-size'):
        assert old not in text, old  # the old spellings still parse, but the help shows timm's names


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
    assert cli.main(['convert', 'resnet18', '--no-pretrained', '--placement', 'post', '--input-size', '3', '64',
                     '64', '-o', path]) == 0
    monkeypatch.undo()  # load() replays the conversion, which plans
    import dpp_surgery
    model = dpp_surgery.load(path)
    assert hasattr(model.layer2[0].conv1, 'dpp')
    # (--pretrained none: the spelling of earlier versions, still read)
    assert cli.main(['convert', 'resnet18', '--pretrained', 'none', '-o', path]) == 1  # exists, no --overwrite
    assert 'exists; pass overwrite=True' in capsys.readouterr().err


@pytest.mark.parametrize('args,message', [
    (['finetune', '--data', '/nonexistent/data'], 'data directory /nonexistent/data does not exist'),
    (['plan', 'no_such_model'], 'Unknown model'),
    (['convert', 'resnet18', '--pretrained-source', 'timm', '-o', 'x.safetensors'],
     'cannot download pretrained weights'),
    (['finetune', '--model', 'resnet18', '--pretrained-source', 'offline'],
     'offline has weights for efficientnet_lite0 only'),
    (['eval', '/nonexistent.safetensors'], 'does not exist'),
    (['finetune', '--epochs', '0'], 'epochs must be >= 1'),
])
def test_errors_are_one_line(args, message):
    res = _run(*args)
    assert res.returncode == 1
    err = res.stderr.strip().splitlines()
    assert err[-1].startswith('dpp-surgery: error:') and message in err[-1], res.stderr[-1500:]
    assert 'Traceback' not in res.stderr


@pytest.mark.parametrize('args, message', [
    (['finetune', '--model', 'resnet18', '--pretrained', 'offline'], 'offline has weights for efficientnet_lite0 only'),
    (['finetune', '--model', 'no/such.safetensors'], 'model checkpoint no/such.safetensors does not exist'),
    (['finetune', '--resume', '/nonexistent/run'], '--resume /nonexistent/run does not exist'),
    (['eval', '--checkpoint', '/nonexistent.safetensors', '--device', 'cpu'], 'does not exist'),
    (['eval', 'a.safetensors', '--checkpoint', 'b.safetensors'], 'pass one checkpoint'),
])
def test_errors_of_the_timm_flags_are_one_line(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith('dpp-surgery: error:') and message in err[-1], err
    assert os.listdir(tmp_path) == []  # nothing written, no run folder


def _crafted_checkpoint(path, **changes):
    """A safetensors file with dpp_surgery metadata that a checkpoint may not hold (see tests/test_checkpoint.py)."""
    import torch
    from safetensors.torch import save_file

    from dpp_surgery.checkpoint import FORMAT
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


needs_data = pytest.mark.skipif(not os.path.isdir(data_mod.DEFAULT_DATA),
                                reason='apt-get install dataset-fashion-mnist')


@needs_data
def test_finetune_then_eval(tmp_path):
    out = str(tmp_path / 'run')
    res = _run('finetune', '--output', out, '--train-subset', '64', '--test-subset', '32', '--epochs', '1',
               '--img-size', '32', '-b', '16', '--no-progress', '--no-amp')
    assert res.returncode == 0, res.stderr[-2000:]
    final = json.loads(res.stdout.strip().splitlines()[-1])
    assert 0 <= final['test_accuracy'] <= 1
    # no --img-size: eval reads the size finetune recorded in the checkpoint (32), not a default
    res = _run('eval', '--checkpoint', os.path.join(out, 'best.safetensors'), '--test-subset', '32', '--device', 'cpu')
    assert res.returncode == 0, res.stderr[-2000:]
    assert 'image size 32 px (recorded in the checkpoint by finetune)' in res.stderr
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result['img_size'] == 32 and result['device'] == 'cpu' and result['amp'] == 'none'
    assert result['count'] == 32 and result['accuracy'] == final['best_test_accuracy']  # same images, float32


def test_eval_image_size_of_a_checkpoint_that_records_none(tmp_path):
    import argparse

    import timm

    import dpp_surgery
    path = str(tmp_path / 'plain.safetensors')
    dpp_surgery.save(timm.create_model('resnet10t', num_classes=10), path)  # as convert and earlier versions wrote
    model = dpp_surgery.load(path)
    args = argparse.Namespace(input_size=None, img_size=None)
    assert cli._img_size(path, model, args) == (176, "the model's pretrained_cfg input size (the checkpoint records "
                                                     'none)')
    assert cli._img_size(path, model, argparse.Namespace(input_size=None, img_size=48))[0] == 48
    assert cli._img_size(path, model, argparse.Namespace(input_size=[3, 40, 40], img_size=None))[0] == 40
    with pytest.raises(ValueError, match='--input-size must be 3 N N'):
        cli._img_size(path, model, argparse.Namespace(input_size=[1, 40, 40], img_size=None))


@needs_data
def test_finetune_a_checkpoint_on_the_command_line_then_resume(tmp_path, capsys):
    import timm

    import dpp_surgery
    model = timm.create_model('resnet10t', num_classes=10)
    dpp_surgery.convert(model, input_size=(3, 32, 32))
    path = str(tmp_path / 'converted.safetensors')
    dpp_surgery.save(model, path)
    out = str(tmp_path / 'run')
    args = ['finetune', '--model', path, '--img-size', '32', '--train-subset', '32', '--test-subset', '16', '-b', '16',
            '--no-amp', '--no-progress', '--threads', '2']
    assert cli.main(args + ['--output', out, '--epochs', '1']) == 0
    assert cli.main(args + ['--resume', out, '--epochs', '2']) == 0  # timm's --resume PATH: the run folder
    with open(os.path.join(out, 'metrics.jsonl')) as f:
        assert [json.loads(line)['epoch'] for line in f] == [1, 2]
    with open(os.path.join(out, 'config.json')) as f:
        assert json.load(f)['model'] == path
    capsys.readouterr()
    # a converted checkpoint has no unconverted copy to distil from: one line that says what to do
    assert cli.main(args + ['--distill', '--output', str(tmp_path / 'distill')]) == 1
    err = capsys.readouterr().err.strip().splitlines()  # (before it: the progress line of loading the checkpoint)
    assert err[-1].startswith('dpp-surgery: error:') and '--no-distill' in err[-1]
    assert sum(line.startswith('dpp-surgery: error:') for line in err) == 1
    assert not (tmp_path / 'distill').exists()


# timm's train.py flag -> the FinetuneConfig field it sets and the value
TIMM_FLAGS = [
    (['--model', 'resnet18'], 'model', 'resnet18'), (['--pretrained'], 'pretrained', True),
    (['--no-pretrained'], 'pretrained', False), (['--pretrained-path', 'w.pth'], 'pretrained_path', 'w.pth'),
    (['--resume', 'runs/a'], 'resume', 'runs/a'), (['--num-classes', '7'], 'num_classes', 7),
    (['--img-size', '48'], 'img_size', 48), (['--input-size', '3', '40', '40'], 'input_size', [3, 40, 40]),
    (['-b', '8'], 'batch_size', 8), (['--batch-size', '8'], 'batch_size', 8),
    (['--grad-accum-steps', '4'], 'grad_accum_steps', 4), (['--opt', 'adamw'], 'opt', 'adamw'),
    (['--momentum', '0.8'], 'momentum', 0.8), (['--weight-decay', '0.05'], 'weight_decay', 0.05),
    (['--sched', 'step'], 'sched', 'step'), (['--lr', '0.1'], 'lr', 0.1), (['--epochs', '3'], 'epochs', 3),
    (['--warmup-epochs', '2'], 'warmup_epochs', 2), (['--smoothing', '0.2'], 'smoothing', 0.2),
    (['--model-ema'], 'model_ema', True), (['--model-ema-decay', '0.99'], 'model_ema_decay', 0.99),
    (['--amp'], 'amp', True), (['--no-amp'], 'amp', False), (['--amp-dtype', 'bfloat16'], 'amp_dtype', 'bfloat16'),
    (['-j', '2'], 'workers', 2), (['--workers', '2'], 'workers', 2), (['--seed', '42'], 'seed', 42),
    (['--output', 'o'], 'output', 'o'), (['--device', 'cpu'], 'device', 'cpu'), (['--data-dir', 'd'], 'data', 'd'),
]
# the spellings of earlier versions, still read
OLD_FLAGS = [
    (['--ema'], {'model_ema': True}), (['--ema-decay', '0.99'], {'model_ema_decay': 0.99}),
    (['--label-smoothing', '0.2'], {'smoothing': 0.2}), (['--accum-steps', '2'], {'grad_accum_steps': 2}),
    (['--num-workers', '2'], {'workers': 2}), (['--pretrained-file', 'w'], {'pretrained_path': 'w'}),
    (['--image-size', '48'], {'img_size': 48}), (['--data', 'd'], {'data': 'd'}), (['--resume'], {'resume': True}),
    (['--amp', 'none'], {'amp': False}), (['--amp', 'auto'], {'amp': True, 'amp_dtype': 'auto'}),
    (['--amp=bf16'], {'amp': True, 'amp_dtype': 'bfloat16'}), (['--amp', 'fp16'], {'amp_dtype': 'float16'}),
    (['--pretrained', 'none'], {'pretrained': False}),
    (['--pretrained', 'timm'], {'pretrained': True, 'pretrained_source': 'timm'}),
]


@pytest.mark.parametrize('argv, field, value', TIMM_FLAGS, ids=[' '.join(a) for a, _, _ in TIMM_FLAGS])
def test_timm_flags_set_their_fields(argv, field, value):
    args = cli.build_parser().parse_args(['finetune', *argv])
    assert getattr(args, field) == value
    defaults = cli.build_parser().parse_args(['finetune'])
    assert getattr(defaults, field) == getattr(FinetuneConfig(), field)


@pytest.mark.parametrize('argv, fields', OLD_FLAGS, ids=[' '.join(a) for a, _ in OLD_FLAGS])
def test_old_flags_still_read(argv, fields):
    args = cli.build_parser().parse_args(cli.upgrade_argv(['finetune', *argv]))
    assert {k: getattr(args, k) for k in fields} == fields


def test_eval_export_and_bench_train_take_timm_flags():
    from dpp_surgery.tools import bench
    args = cli.build_parser().parse_args(['eval', '--checkpoint', 'c.safetensors', '--img-size', '48', '-b', '8',
                                          '-j', '2', '--device', 'cpu', '--amp', '--amp-dtype', 'bfloat16',
                                          '--data-dir', 'd'])
    assert (args.checkpoint_flag, args.img_size, args.batch_size, args.workers, args.device, args.amp,
            args.amp_dtype, args.data) == ('c.safetensors', 48, 8, 2, 'cpu', True, 'bfloat16', 'd')
    assert cli.build_parser().parse_args(['eval', 'c.safetensors']).amp is False  # float32, as timm's validate.py
    assert cli.build_parser().parse_args(['export', '--checkpoint', 'c', '-o', 'x.onnx']).checkpoint_flag == 'c'
    args = bench.build_parser().parse_args(['train', '--img-size', '48', '-b', '4', '--amp-dtype', 'bfloat16'])
    assert (args.size, args.batch, args.amp_on, args.amp_dtype) == (48, 4, True, ['bfloat16'])
    args = bench.build_parser().parse_args(['train', '--size', '40', '--batch', '2', '--no-amp'])
    assert (args.size, args.batch, args.amp_on) == (40, 2, False)
    old = bench._upgrade_train_argv(['train', '--amp', 'none', 'auto', 'bf16', '--channels-last'])  # earlier spelling
    args = bench.build_parser().parse_args(old)
    assert (args.amp_on, args.amp_dtype, args.channels_last) == (True, ['auto', 'bfloat16'], True)
