"""Config loading, `--config.x=v` overrides, their one-line errors, and the entry-point helpers."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from jaxdet.engine.config_cli import ConfigError
from jaxdet.engine.config_cli import load_config
from jaxdet.engine.config_cli import parse_args
from jaxdet.engine.config_cli import save_config
from jaxdet.engine.config_cli import Usage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = '''
import ml_collections
from {pkg}._base_ import common


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.name = 'exp'
  config.seed = 0
  config.max_steps = ml_collections.config_dict.placeholder(int)
  config.grad_clip = ml_collections.config_dict.placeholder(float)
  config.dtype = 'float32'
  config.use_ema = False
  config.workflow = (('train', 1), ('val', 1))
  config.optimizer = common.optimizer()
  config.data = dict(img_scale=(1333, 800), samples_per_gpu=2, extra=None)
  config.model = dict(backbone=dict(depth=50, style='pytorch'))
  if arg == 'smoke':
    config.model.backbone.depth = 18
    config.data.img_scale = (256, 192)
  elif arg is not None:
    raise ValueError(f'unknown config argument {{arg!r}}')
  return config
'''

BASE = '''
import ml_collections


def optimizer():
  return ml_collections.ConfigDict(dict(name='sgd', base_lr=0.01, momentum=0.9, base_batch=16))
'''


@pytest.fixture(scope='module')
def config_path(tmp_path_factory):
  """tmp/expcfgs/exp.py importing tmp/expcfgs/_base_/common.py as `expcfgs._base_.common`."""
  root = tmp_path_factory.mktemp('cfgroot')
  pkg = root / 'expcfgs'
  (pkg / '_base_').mkdir(parents=True)
  (pkg / '_base_' / '__init__.py').write_text('')
  (pkg / '_base_' / 'common.py').write_text(BASE)
  (pkg / 'exp.py').write_text(CONFIG.format(pkg='expcfgs'))
  return str(pkg / 'exp.py')


def test_loads_file_with_base_import_and_arg(config_path):
  config = load_config(config_path)
  assert config.model.backbone.depth == 50
  assert config.optimizer.base_lr == 0.01
  smoke = load_config(config_path + ':smoke')
  assert smoke.model.backbone.depth == 18 and smoke.data.img_scale == (256, 192)
  # Each load is fresh: the smoke run did not change the default.
  assert load_config(config_path).model.backbone.depth == 50


def test_repo_base_configs_load():
  runtime = load_config(os.path.join(REPO, 'configs', '_base_', 'runtime.py'),
                        ['--config.max_steps=5'])
  assert runtime.max_steps == 5


@pytest.mark.parametrize('override, key, expected', [
    ('--config.optimizer.base_lr=0.005', 'optimizer.base_lr', 0.005),
    ('--config.optimizer.base_lr=1', 'optimizer.base_lr', 1.0),          # int -> float
    ('--config.model.backbone.depth=101', 'model.backbone.depth', 101),
    ('--config.data.img_scale=(640,480)', 'data.img_scale', (640, 480)),
    ('--config.data.img_scale=[640, 480]', 'data.img_scale', (640, 480)),  # list -> tuple
    ('--config.data.img_scale=640,480', 'data.img_scale', (640, 480)),
    ("--config.workflow=[('train',1)]", 'workflow', (('train', 1),)),
    ('--config.max_steps=10', 'max_steps', 10),                          # placeholder(int)
    ('--config.max_steps=None', 'max_steps', None),
    ('--config.grad_clip=35', 'grad_clip', 35.0),                        # placeholder(float)
    ('--config.use_ema=true', 'use_ema', True),
    ('--config.use_ema=False', 'use_ema', False),
    ('--config.use_ema=1', 'use_ema', True),
    ('--config.dtype=bfloat16', 'dtype', 'bfloat16'),                    # bare text
    ("--config.dtype='bfloat16'", 'dtype', 'bfloat16'),                  # quoted text
    ('--config.name=123', 'name', '123'),                                # str field keeps text
    ('--config.model.backbone.style=caffe', 'model.backbone.style', 'caffe'),
    ('--config.data.extra=(1, 2.5)', 'data.extra', (1, 2.5)),          # untyped (None) field
])
def test_override_types(config_path, override, key, expected):
  config = load_config(config_path, [override])
  value = config
  for part in key.split('.'):
    value = value[part]
  assert value == expected
  assert type(value) is type(expected)


def test_two_token_form_and_order(config_path):
  config = load_config(config_path + ':smoke', ['--config.max_steps', '7', 'config.seed=3',
                                                '--config.seed=4'])
  assert config.max_steps == 7 and config.seed == 4
  assert config.model.backbone.depth == 18


@pytest.mark.parametrize('override, message', [
    ('--config.optimizer.base_lrr=0.1',
     "unknown config key 'optimizer.base_lrr' (did you mean 'optimizer.base_lr'?)"),
    ('--config.modle.backbone.depth=18',
     "unknown config key 'modle.backbone.depth' (did you mean 'model.backbone.depth'?)"),
    ('--config.zzzzzz=1', "unknown config key 'zzzzzz'"),
    ('--config.seed.x=1', "unknown config key 'seed.x' (did you mean 'seed'?)"),
    ('--config.model.backbone.depth=abc', "config key 'model.backbone.depth' expects an int, got 'abc'"),
    ('--config.model.backbone.depth=1.5', "config key 'model.backbone.depth' expects an int, got '1.5'"),
    ('--config.optimizer.base_lr=fast', "config key 'optimizer.base_lr' expects a float, got 'fast'"),
    ('--config.data.img_scale=640', "config key 'data.img_scale' expects a tuple, got '640'"),
    ('--config.use_ema=maybe', "config key 'use_ema' expects a bool, got 'maybe'"),
    ('--config.max_steps=2.5', "config key 'max_steps' expects an int, got '2.5'"),
    ('--config.seed=None', "config key 'seed' expects int, got None"),
    ('--config.model=1', "config key 'model' is a group (backbone)"),
])
def test_override_errors(config_path, override, message):
  with pytest.raises(ConfigError) as info:
    load_config(config_path, [override])
  text = str(info.value)
  assert text.startswith(message), text
  assert '\n' not in text


def test_file_errors(tmp_path, config_path):
  missing = str(tmp_path / 'nope.py')
  with pytest.raises(ConfigError, match='config file not found: .*nope.py'):
    load_config(missing)
  empty = tmp_path / 'empty.py'
  empty.write_text('x = 1\n')
  with pytest.raises(ConfigError, match=r'empty.py defines no get_config\(\)'):
    load_config(str(empty))
  noarg = tmp_path / 'noarg.py'
  noarg.write_text('def get_config():\n  return {"a": 1}\n')
  assert load_config(str(noarg)).a == 1   # a plain dict becomes a ConfigDict
  with pytest.raises(ConfigError, match=r'noarg.py: get_config\(\) takes no argument'):
    load_config(str(noarg) + ':smoke')
  with pytest.raises(ConfigError, match='path/to/config.py'):
    load_config('configs/atss')
  with pytest.raises(ValueError, match="unknown config argument 'bogus'"):
    load_config(config_path + ':bogus')


def test_save_config_json(tmp_path, config_path):
  config = load_config(config_path, ['--config.max_steps=3'])
  path = tmp_path / 'run' / 'config.json'
  save_config(config, str(path))
  data = json.loads(path.read_text())
  assert data['max_steps'] == 3 and data['grad_clip'] is None
  assert data['data']['img_scale'] == [1333, 800]
  assert data['workflow'] == [['train', 1], ['val', 1]]
  assert data['model']['backbone'] == {'depth': 50, 'style': 'pytorch'}
  assert os.listdir(path.parent) == ['config.json']   # no temporary file left


def test_parse_args():
  spec, overrides, flags = parse_args([
      '--config', 'configs/atss.py:smoke', '--config.max_steps=5', '--config.seed', '-1',
      '--workdir', 'runs/a', '--dry-run'])
  assert spec == 'configs/atss.py:smoke'
  assert overrides == ['--config.max_steps=5', '--config.seed=-1']
  assert flags == {'workdir': 'runs/a', 'dry_run': True}
  spec, _, flags = parse_args(['--config=c.py', '--checkpoint=ck'], known_flags=('checkpoint',))
  assert spec == 'c.py' and flags == {'checkpoint': 'ck'}
  with pytest.raises(ConfigError, match=r"unknown flag '--workdri' \(did you mean '--workdir'\?\)"):
    parse_args(['--config', 'c.py', '--workdri', 'x'], known_flags=('workdir',))
  with pytest.raises(ConfigError, match='missing --config'):
    parse_args(['--workdir', 'x'])
  with pytest.raises(ConfigError, match="unexpected argument 'stray'"):
    parse_args(['--config', 'c.py', 'stray'])
  assert parse_args(['-h'])[2] == {'help': True}


ENTRY = textwrap.dedent('''
  import sys
  from jaxdet.engine.config_cli import load_config, main_error_exit, parse_args

  def main(argv=None):
    spec, overrides, flags = parse_args(sys.argv[1:] if argv is None else argv,
                                        known_flags=('workdir',))
    config = load_config(spec, overrides)
    print('base_lr', config.optimizer.base_lr)
    return 0

  assert main_error_exit(main) == 0
''')


def _run_entry(*argv):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  env.pop('JAXDET_TRACEBACK', None)
  return subprocess.run([sys.executable, '-c', ENTRY, *argv], capture_output=True, text=True,
                        env=env, timeout=120)


def test_entry_point_one_line_error(config_path):
  ok = _run_entry('--config', config_path, '--config.optimizer.base_lr=0.005')
  assert ok.returncode == 0, ok.stderr
  assert ok.stdout.strip() == 'base_lr 0.005'

  bad = _run_entry('--config', config_path, '--config.optimizer.base_lrr=0.005')
  assert bad.returncode == 2
  assert bad.stdout == ''
  assert bad.stderr.strip() == ("error: unknown config key 'optimizer.base_lrr' "
                                "(did you mean 'optimizer.base_lr'?)")
  assert 'Traceback' not in bad.stderr

  missing = _run_entry('--config', 'no/such/config.py')
  assert missing.returncode == 2
  lines = missing.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: config file not found:')


USAGE = Usage(command='python -m tool', summary='Does a thing to a checkpoint.',
              flags=(('--checkpoint DIR', 'a work_dir or a step folder', True),
                     ('--out FILE', 'where the result goes')),
              more='README.md "Tool".')


def test_usage_text_names_every_flag_once_with_its_meaning():
  assert USAGE.text(width=60).splitlines()[:3] == ['usage: python -m tool --config CONFIG.py[:ARG]',
                       '           --checkpoint DIR [--out FILE]',
                       '           [--config.KEY=VALUE ...]']
  lines = USAGE.text().splitlines()
  for flag, meaning in [('--config CONFIG.py[:ARG]', 'the config file'),
                        ('--checkpoint DIR', 'a work_dir or a step folder (required)'),
                        ('--out FILE', 'where the result goes'),
                        ('--config.KEY=VALUE', 'set one config key'),
                        ('--print-config', 'print the resolved config'),
                        ('-h, --help', 'this help')]:
    row = [l for l in lines[lines.index('flags:'):] if l.startswith('  ' + flag)]
    assert len(row) == 1 and meaning in row[0], (flag, row)
  assert lines[-1] == 'more: README.md "Tool".'
  assert 'Does a thing to a checkpoint.' in lines


def _exit(capsys, argv, **kw):
  with pytest.raises(SystemExit) as e:
    parse_args(argv, known_flags=('checkpoint', 'out'), usage=USAGE, **kw)
  assert e.value.code in (0, None)
  return capsys.readouterr().out


def test_help_and_print_config_exit_zero_before_other_checks(capsys, config_path):
  out = _exit(capsys, ['-h'])
  assert out.startswith('usage: python -m tool') and '# resolved config' not in out
  assert _exit(capsys, ['--help', '--out', 'x']) == out
  out = _exit(capsys, ['--config', config_path + ':smoke', '--config.optimizer.base_lr=0.5',
                       '--help'])
  assert out.startswith('usage: python -m tool')
  config = out[out.index('# resolved config'):].splitlines()
  assert config[0] == f'# resolved config: {config_path}:smoke + 1 override(s)'
  assert 'optimizer.base_lr = 0.5' in config and 'model.backbone.depth = 18' in config
  assert 'data.img_scale = (256, 192)' in config and 'max_steps = None' in config
  # Every leaf once, each line an override that load_config accepts.
  leaves = [l.split(' = ')[0] for l in config[1:]]
  assert len(leaves) == len(set(leaves)) == 16
  printed = _exit(capsys, ['--config', config_path, '--print-config'])
  assert printed.startswith(f'# resolved config: {config_path}\n')
  reloaded = load_config(config_path, [f"--config.{l.replace(' = ', '=', 1)}"
                                       for l in printed.splitlines()[1:]])
  assert reloaded == load_config(config_path)


def test_help_with_a_bad_config_is_the_training_error(capsys, config_path):
  with pytest.raises(ConfigError) as e:
    parse_args(['--config', config_path, '--config.optimizer.base_lrr=1', '--help'],
               usage=USAGE)
  with pytest.raises(ConfigError) as same:
    load_config(config_path, ['--config.optimizer.base_lrr=1'])
  assert str(e.value) == str(same.value)
  with pytest.raises(ConfigError, match='--print-config needs --config'):
    parse_args(['--print-config'], usage=USAGE)
  with pytest.raises(ConfigError, match="unknown flag '--outt'"):
    parse_args(['--outt', 'x', '--help'], known_flags=('out',), usage=USAGE)
  assert capsys.readouterr().out == ''


# Every entry point, with the flags its usage line must name (the required ones).
COMMANDS = {
    'jaxdet.train': ['--config'],
    'jaxdet.evaluate': ['--config', '--checkpoint'],
    'jaxdet.info': ['--config'],
    'jaxdet.convert': ['--config', '--from-mmdet', '--out'],
    'jaxdet.infer': ['--config', '--checkpoint'],
    'jaxdet.data.shapes': ['--out'],
}


def _start(*argv):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''),
             JAX_PLATFORMS='cpu')
  env.pop('JAXDET_TRACEBACK', None)
  return subprocess.Popen([sys.executable, '-m', *argv], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env)


def _finish(process):
  out, err = process.communicate(timeout=300)
  return process.returncode, out, err


def _run_module(capsys, monkeypatch, name, *argv):
  """`python -m name argv` in this process: runpy runs the module as `__main__`, as `python -m`
  does (its `if __name__ == '__main__'` block included); the exit code, stdout and stderr."""
  import runpy
  import warnings
  monkeypatch.setattr(sys, 'argv', [name, *argv])
  monkeypatch.delenv('JAXDET_TRACEBACK', raising=False)
  capsys.readouterr()
  code = 0
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', RuntimeWarning)  # "found in sys.modules": already imported
    try:
      runpy.run_module(name, run_name='__main__', alter_sys=True)
    except SystemExit as e:
      code = 0 if e.code is None else e.code
  out, err = capsys.readouterr()
  return code, out, err


def test_every_entry_point_answers_help(capsys, monkeypatch):
  """`-h` / `--help` exit 0 with a usage naming the required flags (each entry point run as
  `python -m` does, in this process); `--config X --help` also prints the resolved config (after
  overrides) instead of running; an unknown key there is the training's one-line error. The last
  two are real `python -m` subprocesses (in parallel, each imports jax): what a user runs.
  (-h / --help / --print-config parsing is unit-tested above.)"""
  smoke = ['--config', 'configs/atss.py:smoke', '--config.optimizer.base_lr=0.5']
  runs = {'train_config': _start('jaxdet.train', *smoke, '--help'),
          'evaluate_bad_key': _start('jaxdet.evaluate', *smoke, '--config.optimizer.base_lrr=1',
                                     '--print-config')}
  monkeypatch.chdir(REPO)
  for i, name in enumerate(COMMANDS):
    flag = ('-h', '--help')[i % 2]
    code, out, err = _run_module(capsys, monkeypatch, name, flag)
    assert code == 0, (name, flag, err)
    usage = out[:out.index('\n\n')]  # the usage line(s)
    assert usage.startswith(f'usage: python -m {name}'), (name, out)
    for required in COMMANDS[name]:
      assert f' {required} ' in usage.replace('\n', ' ') + ' ', (name, required, usage)
    assert '--help' in out
    if name != 'jaxdet.data.shapes':
      assert '--config.KEY=VALUE' in out and 'more:' in out, (name, out)
  # in-process too: the same one-line error as the subprocess below
  code, out, err = _run_module(capsys, monkeypatch, 'jaxdet.info', *smoke,
                               '--config.optimizer.base_lrr=1')
  assert (code, out) == (2, '') and err.startswith("error: unknown config key 'optimizer.base_lrr'")
  results = {key: _finish(p) for key, p in runs.items()}

  code, out, err = results['train_config']  # the case: it used to start training
  assert code == 0, err
  assert out.startswith('usage: python -m jaxdet.train')
  assert '\n# resolved config: configs/atss.py:smoke + 1 override(s)\n' in out
  assert 'optimizer.base_lr = 0.5' in out and "model.type = 'atss'" in out
  code, out, err = results['evaluate_bad_key']  # before evaluate's '--checkpoint is required'
  assert code == 2 and out == ''
  assert err.strip() == ("error: unknown config key 'optimizer.base_lrr' "
                         "(did you mean 'optimizer.base_lr'?)")


def test_an_empty_group_takes_a_dict_literal():
  """Free mappings such as optimizer.paramwise.custom_keys ({} in the config) are set whole;
  non-empty groups still only take their fields."""
  import ml_collections
  from configs._base_ import optimizer as optimizer_base
  from jaxdet.engine.config_cli import apply_override

  config = ml_collections.ConfigDict(dict(optimizer=optimizer_base.sgd()))
  assert dict(config.optimizer.paramwise.custom_keys) == {}
  apply_override(config, 'optimizer.paramwise.custom_keys', "{'backbone': {'lr_mult': 0.1}}")
  apply_override(config, 'optimizer.paramwise.custom_keys.backbone.lr_mult', '0.2')
  assert config.optimizer.paramwise.custom_keys.backbone.to_dict() == {'lr_mult': 0.2}
  empty = ml_collections.ConfigDict(dict(optimizer=optimizer_base.sgd()))
  with pytest.raises(ConfigError, match="'optimizer.paramwise.custom_keys' is an empty group: "
                                        "it takes a dict literal, got '3'"):
    apply_override(empty, 'optimizer.paramwise.custom_keys', '3')
  with pytest.raises(ConfigError, match="config key 'optimizer.paramwise' is a group"):
    apply_override(empty, 'optimizer.paramwise', "{'a': 1}")
