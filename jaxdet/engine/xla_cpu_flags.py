"""XLA:CPU flags that jaxdet's commands run with: measured faster for detectors on the CPU.

jax 0.10's XLA:CPU hands convolutions and matrix products to YNNPACK library fusions by default.
On this project's CPU (2 AVX2 cores) YNNPACK's convolution kernel gradients ran at 30-60
GFLOP/s where XLA's Eigen convolutions run at ~140, and its reductions (BatchNorm's parameter
gradients, column sums) were rewritten into slow loops. Measured (experiments/README.md,
issue 20), with the same numbers to test tolerance:

- ``--xla_cpu_experimental_ynn_fusion_type=reduce``: YNNPACK for reductions only; convolutions
  and matrix products go to Eigen.
- ``--xla_cpu_enable_concurrency_optimized_scheduler=false``: XLA's default scheduler, which
  keeps fewer buffers alive (~4% faster steps here).

ATSS's smoke step went from 274 to 178 ms (160 x 160, 16 images); with
``jaxdet.ops.conv_general_dilated`` RetinaNet's 512 x 512 step from 9.0 to 5.4 s.

XLA reads ``XLA_FLAGS`` once, when JAX starts its backends, and aborts the process on a flag it
does not know. So ``set_xla_cpu_flags()`` must run before the first JAX computation
(``python -m jaxdet.train``, ``jaxdet.evaluate``, ``jaxdet.infer``, the experiments and the tests
call it first thing); it adds each flag that ``XLA_FLAGS`` does not already set (the user's
value wins), and only on the jaxlib versions whose XLA has these flags. Library callers may call
it the same way.
"""
import os

import jaxlib

FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=reduce',
         '--xla_cpu_enable_concurrency_optimized_scheduler=false')
KNOWN_ON = ('0.10.', '0.11.')  # jaxlib versions whose XLA has both flags


def set_xla_cpu_flags(environ=None):
  """Adds `FLAGS` to `environ['XLA_FLAGS']` (default os.environ) where that does not set them.
  Returns the flags added (none on a jaxlib outside `KNOWN_ON`)."""
  environ = os.environ if environ is None else environ
  if not jaxlib.__version__.startswith(KNOWN_ON):
    return ()
  current = environ.get('XLA_FLAGS', '')
  added = tuple(flag for flag in FLAGS if flag.split('=')[0] + '=' not in current)
  if added:
    environ['XLA_FLAGS'] = ' '.join([current, *added]).strip()
  return added
