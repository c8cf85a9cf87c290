"""jaxdet.ops.max_pool2d against a loop-based numpy reference of torch's max_pool2d (value and
gradient: each window sends its gradient to the first maximum in row-major window order)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdet.ops import max_pool2d


def reference(x, g, window, stride, padding):
  """Per output pixel and channel, scan the window row by row; keep the first maximum."""
  (kh, kw), (sh, sw), (ph, pw) = window, stride, padding
  b, h, w, c = x.shape
  ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
  y = np.zeros((b, ho, wo, c), x.dtype)
  grad = np.zeros_like(x)
  for n in range(b):
    for r in range(ho):
      for q in range(wo):
        for ch in range(c):
          best = None
          for i in range(kh):
            for j in range(kw):
              yy, xx = r * sh + i - ph, q * sw + j - pw
              if 0 <= yy < h and 0 <= xx < w and (best is None
                                                  or x[n, yy, xx, ch] > x[n, best[0], best[1], ch]):
                best = (yy, xx)
          y[n, r, q, ch] = x[n, best[0], best[1], ch]
          grad[n, best[0], best[1], ch] += g[n, r, q, ch]
  return y, grad


@pytest.mark.parametrize('shape,window,stride,padding,ties', [
    ((2, 9, 8, 3), (3, 3), (2, 2), (1, 1), True),     # ResNet's stem pool, many equal values
    ((1, 10, 11, 2), (3, 3), (2, 2), (1, 1), False),
    ((2, 7, 7, 2), (2, 2), (2, 2), (0, 0), True),     # non-overlapping windows
    ((1, 8, 9, 2), (3, 2), (1, 2), (1, 0), True),     # mixed strides, window and padding
])
def test_value_and_gradient_equal_torch_rule(shape, window, stride, padding, ties):
  rng = np.random.default_rng(sum(shape))
  x = (rng.integers(0, 3, shape) if ties else rng.normal(size=shape)).astype(np.float32)
  y, vjp = jax.vjp(lambda x: max_pool2d(x, window, stride, padding), jnp.asarray(x))
  g = rng.normal(size=y.shape).astype(np.float32)
  y_ref, grad_ref = reference(x, g, window, stride, padding)
  np.testing.assert_array_equal(np.asarray(y), y_ref)
  np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(g))[0]), grad_ref, rtol=1e-6, atol=1e-6)


def test_same_as_flax_max_pool_under_jit():
  """Forward bit-equal to flax's max_pool; gradients equal (jit, after a ReLU as in ResNet)."""
  x = jax.nn.relu(jax.random.normal(jax.random.key(0), (2, 16, 12, 4)))
  flax_pool = lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  np.testing.assert_array_equal(jax.jit(max_pool2d)(x), flax_pool(x))
  loss = lambda pool: jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(pool(x)))))
  np.testing.assert_allclose(loss(max_pool2d)(x), loss(flax_pool)(x), rtol=1e-6, atol=1e-7)
