"""`config.cpu_devices`: the CPU split into N XLA devices, the global batch unchanged."""
import os
import subprocess
import sys
import textwrap

import ml_collections
import pytest

from jaxdet.engine.config_cli import ConfigError
from jaxdet.engine.cpu_devices import request_cpu_devices, split_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(cpu_devices, samples_per_gpu=16):
  return ml_collections.ConfigDict(dict(cpu_devices=cpu_devices,
                                        data=dict(samples_per_gpu=samples_per_gpu)))


def test_split_in_a_fresh_process():
  """Requested before JAX starts: 2 CPU devices, 8 of the 16 images each, the given config
  untouched; 5 images do not split in 2: a one-line error naming both keys."""
  code = textwrap.dedent('''
      import jax, ml_collections
      from jaxdet.engine.cpu_devices import request_cpu_devices, split_batch
      given = ml_collections.ConfigDict(dict(cpu_devices=2, data=dict(samples_per_gpu=16)))
      request_cpu_devices(given)
      run, message = split_batch(given)
      print(jax.local_device_count(), run.data.samples_per_gpu, given.data.samples_per_gpu)
      print(message)
      given.data.samples_per_gpu = 5
      try:
        split_batch(given)
      except ValueError as e:
        print(e)
  ''')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120, check=True).stdout.splitlines()
  assert out[0] == '2 8 16'
  assert out[1] == ('CPU split into 2 XLA devices (config.cpu_devices): 8 of the 16 images per '
                    'step on each')
  assert out[2].startswith('cpu_devices=2: data.samples_per_gpu=5 must be a multiple of it')
  assert len(out) == 3


def test_one_device_is_a_no_op():
  config = _config(1)
  request_cpu_devices(config)
  assert split_batch(config) == (config, None)


def test_after_jax_started_it_is_not_applied():
  import jax
  jax.local_device_count()   # backends started (with this process's device count)
  n = jax.local_device_count() + 1
  config = _config(n, samples_per_gpu=16 * n)
  request_cpu_devices(config)   # too late: ignored
  assert jax.local_device_count() == n - 1
  run, message = split_batch(config)
  assert run is config and run.data.samples_per_gpu == 16 * n
  assert message == f'cpu_devices={n} not applied: this process has {n - 1} CPU device(s)'


@pytest.mark.parametrize('cpu_devices', [0, 2.0, True])
def test_bad_values_are_one_line_errors(cpu_devices):
  for fn in (request_cpu_devices, split_batch):
    with pytest.raises(ConfigError, match=r'^cpu_devices: must be an integer >= 1, got') as err:
      fn(_config(cpu_devices))
    assert '\n' not in str(err.value)


def test_the_train_command_requests_the_devices(tmp_path):
  """`python -m jaxdet.train` asks for the devices before JAX starts: the batch check, which only
  runs on a CPU split into exactly `cpu_devices` devices, then stops it with one line."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  out = subprocess.run([sys.executable, '-m', 'jaxdet.train', '--config', 'configs/atss.py:smoke',
                        '--workdir', str(tmp_path / 'run'), '--config.cpu_devices=2',
                        '--config.data.samples_per_gpu=3'], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 2, out.stderr
  assert out.stderr.strip() == ('error: cpu_devices=2: data.samples_per_gpu=3 must be a multiple '
                                'of it (each of the 2 CPU devices takes an equal share)')
