"""jaxdet.ops.conv_general_dilated (kernel gradient as matrix products) and the XLA:CPU flags.

References: lax.conv_general_dilated itself (forward value and input gradient, bit for bit) and
a float64 numpy kernel gradient written as the definition's loop over kernel positions.
"""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import pytest
from jax import lax

from jaxdet import train
from jaxdet.engine import config_cli, xla_cpu_flags
from jaxdet.models.layers import Conv
from jaxdet.ops.conv import conv_general_dilated, kernel_grad_by_products

DN = ('NHWC', 'HWIO', 'NHWC')
ATSS_SMOKE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          'configs', 'atss.py') + ':smoke'


def kernel_grad_float64(x, g, kernel_size, strides, pads, dilation):
  """dW[i, j] = sum over output positions of x_pad[at (i, j) + stride * position] g[position]."""
  x = np.pad(np.asarray(x, np.float64), ((0, 0), (max(pads[0][0], 0), max(pads[0][1], 0)),
                                         (max(pads[1][0], 0), max(pads[1][1], 0)), (0, 0)))
  x = x[:, max(-pads[0][0], 0):x.shape[1] - max(-pads[0][1], 0),
        max(-pads[1][0], 0):x.shape[2] - max(-pads[1][1], 0)]
  g = np.asarray(g, np.float64)
  _, oh, ow, _ = g.shape
  dw = np.zeros((*kernel_size, x.shape[-1], g.shape[-1]))
  for i in range(kernel_size[0]):
    for j in range(kernel_size[1]):
      for y in range(oh):
        for xx in range(ow):
          seen = x[:, y * strides[0] + i * dilation[0], xx * strides[1] + j * dilation[1]]
          dw[i, j] += seen.T @ g[:, y, xx]
  return dw


# (input NHWC, kernel HWIO, strides, padding, dilation)
CASES = [
    ((2, 9, 11, 5), (3, 3, 5, 7), (1, 1), ((1, 1), (1, 1)), (1, 1)),
    ((2, 9, 11, 5), (3, 3, 5, 7), (2, 2), ((1, 1), (1, 1)), (1, 1)),
    ((2, 9, 11, 5), (1, 1, 5, 7), (2, 2), ((0, 0), (0, 0)), (1, 1)),
    ((1, 13, 12, 3), (7, 7, 3, 4), (2, 2), ((3, 3), (3, 3)), (1, 1)),
    ((2, 14, 14, 4), (3, 3, 4, 6), (1, 1), ((3, 3), (3, 3)), (3, 3)),
    ((2, 10, 10, 4), (3, 3, 4, 6), (2, 1), ((0, 1), (2, -1)), (1, 2)),
]


@pytest.mark.parametrize('x_shape, w_shape, strides, pads, dilation', CASES)
def test_kernel_grad_by_products_equals_the_definition(x_shape, w_shape, strides, pads, dilation):
  rng = np.random.default_rng(0)
  x = rng.standard_normal(x_shape).astype(np.float32)
  w = rng.standard_normal(w_shape).astype(np.float32)
  y = lax.conv_general_dilated(x, w, strides, pads, rhs_dilation=dilation, dimension_numbers=DN)
  g = rng.standard_normal(y.shape).astype(np.float32)
  got = kernel_grad_by_products(jnp.asarray(x), jnp.asarray(g), w_shape[:2], strides, pads,
                                dilation)
  want = kernel_grad_float64(x, g, w_shape[:2], strides, pads, dilation)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)
  # lax's own kernel gradient agrees with the same reference
  lax_dw = jax.vjp(lambda w: lax.conv_general_dilated(x, w, strides, pads, rhs_dilation=dilation,
                                                      dimension_numbers=DN), w)[1](g)[0]
  np.testing.assert_allclose(np.asarray(lax_dw), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('w_shape, strides, padding', [
    ((1, 1, 8, 6), (1, 1), ((0, 0), (0, 0))),        # 1 x 1: products
    ((1, 1, 8, 6), (2, 2), 'VALID'),                 # strided 1 x 1: products
    ((3, 3, 256, 4), (2, 2), 'SAME'),                # k x k on >= 256 channels: products
    ((3, 3, 8, 6), (1, 1), ((1, 1), (1, 1))),        # k x k on few channels: lax
])
def test_value_and_input_gradient_are_lax_and_kernel_gradient_matches(w_shape, strides, padding):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 10, 9, w_shape[2])), jnp.float32)
  w = jnp.asarray(rng.standard_normal(w_shape) * 0.1, jnp.float32)
  ours = lambda x, w: conv_general_dilated(x, w, strides, padding, dimension_numbers=DN)
  plain = lambda x, w: lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN)
  y, vjp = jax.vjp(jax.jit(ours), x, w)
  y_lax, vjp_lax = jax.vjp(jax.jit(plain), x, w)
  g = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
  (dx, dw), (dx_lax, dw_lax) = vjp(g), vjp_lax(g)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_lax))
  np.testing.assert_array_equal(np.asarray(dx), np.asarray(dx_lax))
  np.testing.assert_allclose(np.asarray(dw), np.asarray(dw_lax), rtol=1e-5, atol=1e-4)


def test_grouped_convolution_is_lax_itself():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((2, 6, 6, 8)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((1, 1, 4, 8)), jnp.float32)
  kw = dict(window_strides=(1, 1), padding='VALID', dimension_numbers=DN, feature_group_count=2)
  loss = lambda f: lambda w: jnp.sum(f(x, w, **kw) ** 2)
  np.testing.assert_array_equal(np.asarray(jax.grad(loss(conv_general_dilated))(w)),
                                np.asarray(jax.grad(loss(lax.conv_general_dilated))(w)))


def test_conv_module_is_nn_conv_with_the_same_parameters_and_value():
  x = jnp.asarray(np.random.default_rng(3).standard_normal((1, 7, 7, 3)), jnp.float32)
  ours = Conv(5, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), name='conv')
  plain = nn.Conv(5, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), name='conv')
  assert isinstance(ours, nn.Conv)
  variables = plain.init(jax.random.key(0), x)
  assert (jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x))
          == jax.tree.map(jnp.shape, variables))
  np.testing.assert_array_equal(np.asarray(ours.apply(variables, x)),
                                np.asarray(plain.apply(variables, x)))


def test_set_xla_cpu_flags_adds_missing_flags_and_keeps_the_users():
  env = {}
  assert xla_cpu_flags.set_xla_cpu_flags(environ=env) == xla_cpu_flags.FLAGS
  assert env['XLA_FLAGS'].split() == list(xla_cpu_flags.FLAGS)
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=2 '
                      '--xla_cpu_experimental_ynn_fusion_type=individual_convolution'}
  assert xla_cpu_flags.set_xla_cpu_flags(environ=env) == xla_cpu_flags.FLAGS[1:]
  assert env['XLA_FLAGS'].split() == ['--xla_force_host_platform_device_count=2',
                                      '--xla_cpu_experimental_ynn_fusion_type=individual_convolution',
                                      *xla_cpu_flags.FLAGS[1:]]
  assert xla_cpu_flags.set_xla_cpu_flags(environ=env) == ()   # all set: nothing added twice


def test_config_chooses_the_flags_and_a_bad_value_is_a_one_line_error():
  config = config_cli.load_config(ATSS_SMOKE)
  assert tuple(config.xla_cpu_flags.split()) == xla_cpu_flags.FLAGS   # the runtime default
  env = {}
  config.xla_cpu_flags = ''                                          # XLA's own defaults
  assert xla_cpu_flags.set_xla_cpu_flags(config, env) == () and env == {}
  config.xla_cpu_flags = '--xla_cpu_use_xnnpack=true'
  assert xla_cpu_flags.set_xla_cpu_flags(config, env) == ('--xla_cpu_use_xnnpack=true',)
  for bad in ('xla_cpu_use_xnnpack=true', '--xla_gpu_autotune_level=0', '--xla_cpu_no_value'):
    config.xla_cpu_flags = bad
    with pytest.raises(config_cli.ConfigError, match='xla_cpu_flags: expected'):
      xla_cpu_flags.set_xla_cpu_flags(config, {})
  with pytest.raises(config_cli.ConfigError, match='xla_cpu_flags'):   # the command, first thing
    train.main(['--config', ATSS_SMOKE, '--config.xla_cpu_flags=--xla_cpu_oops'])


def test_set_xla_cpu_flags_leaves_an_unknown_jaxlib_alone(monkeypatch):
  monkeypatch.setattr(jaxlib, '__version__', '9.0.0')
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  assert xla_cpu_flags.set_xla_cpu_flags(environ=env) == ()
  assert env == {'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}


@pytest.mark.skipif(jax.default_backend() != 'cpu'
                    or not jaxlib.__version__.startswith(xla_cpu_flags.KNOWN_ON),
                    reason='XLA:CPU flags of jax 0.10 / 0.11')
def test_this_process_compiles_convolutions_without_ynnpack():
  """conftest.py set the flags before JAX started (as the commands do): XLA:CPU compiles a
  convolution's gradient to Eigen convolutions, not to YNNPACK fusions (its default in jax 0.10
  at this size)."""
  assert all(flag in os.environ['XLA_FLAGS'].split() for flag in xla_cpu_flags.FLAGS)
  grad = jax.jit(jax.grad(lambda x, w: jnp.sum(lax.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=DN)), argnums=1))
  hlo = grad.lower(jnp.ones((2, 64, 64, 256)), jnp.ones((3, 3, 256, 256))).compile().as_text()
  assert 'convolution(' in hlo
  assert '__ynn_fusion' not in hlo
