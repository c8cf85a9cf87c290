"""XLA:CPU flags that jaxdet's commands run with (`config.xla_cpu_flags`), measured faster.

jax 0.10's XLA:CPU hands convolutions and matrix products to YNNPACK library fusions by default.
On this project's CPU (2 AVX2 cores) YNNPACK's convolution kernel gradients ran at 30-60
GFLOP/s where XLA's Eigen convolutions run at ~110-140, and without YNNPACK XLA rewrites the
reductions of BatchNorm's parameter gradients into slow loops. The default (`FLAGS`, measured in
experiments/README.md, issue 20; the numbers equal to test tolerance):

- ``--xla_cpu_experimental_ynn_fusion_type=reduce``: YNNPACK for reductions only; convolutions
  and matrix products go to Eigen.
- ``--xla_cpu_enable_concurrency_optimized_scheduler=false``: XLA's other scheduler (~4% faster
  steps here).

ATSS's smoke step went from 274 to 178 ms (160 x 160, 16 images), RetinaNet's 512 x 512 step
from 9.0 to 6.1 s (5.4 s with ``jaxdet.ops.conv_general_dilated``). DETR's smoke step (small
matrix products) ran 8% faster with XLA's defaults: its smoke config sets ``xla_cpu_flags=''``.

XLA reads ``XLA_FLAGS`` once, when JAX starts its backends, and aborts the process on a flag it
does not know. So ``set_xla_cpu_flags`` must run before the first JAX computation
(``python -m jaxdet.train``, ``jaxdet.evaluate`` and ``jaxdet.infer`` call it after reading the
config; the experiments and the tests' conftest too); it adds each flag that ``XLA_FLAGS`` does
not already set (the user's value wins), and only on the jaxlib versions whose XLA has these
flags. Library callers may call it the same way.
"""
import os

import jaxlib

from jaxdet.engine.config_cli import ConfigError

FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=reduce',
         '--xla_cpu_enable_concurrency_optimized_scheduler=false')
KNOWN_ON = ('0.10.', '0.11.')  # jaxlib versions whose XLA has both flags


def _flags_of(config):
  if config is None:
    return FLAGS
  value = config.get('xla_cpu_flags', ' '.join(FLAGS))
  flags = tuple(value.split()) if isinstance(value, str) else None
  if flags is None or not all(f.startswith('--xla_cpu_') and '=' in f for f in flags):
    raise ConfigError(f'xla_cpu_flags: expected a string of --xla_cpu_NAME=VALUE flags separated '
                      f"by spaces ('' for XLA's defaults), got {value!r}")
  return flags


def set_xla_cpu_flags(config=None, environ=None):
  """Adds `config.xla_cpu_flags` (default `FLAGS`) to `environ['XLA_FLAGS']` (default
  os.environ), each flag that it does not set already. Returns the flags added (none on a
  jaxlib outside `KNOWN_ON`). A malformed `xla_cpu_flags` is a one-line ConfigError."""
  flags = _flags_of(config)
  environ = os.environ if environ is None else environ
  if not jaxlib.__version__.startswith(KNOWN_ON):
    return ()
  current = environ.get('XLA_FLAGS', '')
  added = tuple(flag for flag in flags if flag.split('=')[0] + '=' not in current)
  if added:
    environ['XLA_FLAGS'] = ' '.join([current, *added]).strip()
  return added
