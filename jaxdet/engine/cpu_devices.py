"""Training on a CPU split into several XLA devices (`config.cpu_devices`).

XLA:CPU runs one program at a time, its large ops on all cores, its many small ops (copies,
elementwise fusions, the assigner) on one. Split into N devices (JAX's `jax_num_cpu_devices`),
the CPU runs N step programs side by side under `jax.pmap`, each on its share of the batch, and
the cores stay busier: the ATSS smoke step on the 2-core CPU went from 58 to 70 img/s with 2
devices (experiments/README.md, issue 20).

`data.samples_per_gpu` stays the images per accelerator: on the split CPU each XLA device takes
samples_per_gpu / cpu_devices of them, so the global batch, the scaled lr and the schedule are
those of the unsplit run. What changes is per device, as on N GPUs: trained BatchNorm layers see
the statistics of their device's images, and the gradients are averaged over the devices.

`python -m jaxdet.train` asks JAX for the devices before its backends start
(`request_cpu_devices`); `train_and_evaluate` then shares the batch among them (`split_batch`)
when the process has exactly that many CPU devices. Called from Python (a notebook, the tests),
training keeps the process's devices: the setting applies where it can and says so in the log
where it cannot. On a GPU / TPU host it does nothing.
"""
import copy
import os

import jax

from jaxdet.engine.config_cli import ConfigError


def _cpu_devices(config):
  n = config.get('cpu_devices', 1)
  if not isinstance(n, int) or isinstance(n, bool) or n < 1:
    raise ConfigError(f'cpu_devices: must be an integer >= 1, got {n!r}')
  return n


def request_cpu_devices(config):
  """Asks JAX for `config.cpu_devices` CPU devices; call it before JAX starts its backends
  (`python -m jaxdet.train` does, first thing: the command owns its process). Does nothing when
  the setting is 1 or `XLA_FLAGS` sets `--xla_force_host_platform_device_count` (that flag
  decides), or when the backends already started. A library caller keeps its process's devices."""
  n = _cpu_devices(config)
  if n == 1 or 'xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', ''):
    return
  try:
    jax.config.update('jax_num_cpu_devices', n)
  except RuntimeError:  # backends already started: `split_batch` reports it
    pass


def split_batch(config):
  """(config, message): with `config.cpu_devices` = N > 1 and training on exactly N CPU devices,
  a copy of `config` whose `data.samples_per_gpu` is each device's share (samples_per_gpu / N),
  so the global batch is the unsplit one; otherwise `config` itself. `message` is the line for
  the log (None when N is 1)."""
  n = _cpu_devices(config)
  if n == 1:
    return config, None
  if jax.default_backend() != 'cpu':
    return config, f'cpu_devices={n} not applied: training runs on {jax.default_backend()}'
  if jax.local_device_count() != n:
    return config, (f'cpu_devices={n} not applied: this process has {jax.local_device_count()} '
                    f'CPU device(s)')
  per_accelerator = config.data.samples_per_gpu
  if per_accelerator % n:
    raise ConfigError(f'cpu_devices={n}: data.samples_per_gpu={per_accelerator} must be a '
                      f'multiple of it (each of the {n} CPU devices takes an equal share)')
  config = copy.deepcopy(config)
  config.data.samples_per_gpu = per_accelerator // n
  return config, (f'CPU split into {n} XLA devices (config.cpu_devices): {per_accelerator // n} '
                  f'of the {per_accelerator} images per step on each')
