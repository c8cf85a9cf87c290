"""``lax.conv_general_dilated`` whose kernel gradient is matrix products on the CPU.

XLA:CPU computes a convolution's kernel gradient as another convolution, over the input
transposed so that its batch is the contracted feature (``(C, H, W, N)``): for a 1 x 1 kernel
that transpose and convolution cost 2-10x a matrix product of the same FLOPs on this project's
2-core CPU (experiments/README.md, issue 20). Here the kernel gradient is a sum of matrix
products instead:

    dW[i, j, c, o] = sum_{n, y, x} x_pad[n, y * sh + i * dh, x * sw + j * dw, c] * g[n, y, x, o]

one ``(N * OH * OW, C)^T @ (N * OH * OW, O)`` product per kernel position (i, j), on the
strided slice of the padded input that this position sees; a 1 x 1 kernel is one product.

``conv_general_dilated`` has ``lax.conv_general_dilated``'s signature, so it drops into
``flax.linen.Conv(conv_general_dilated=...)`` (``jaxdet.models.layers.Conv``). The forward
value and the input gradient are lax's own (the same XLA ops, the same numbers); only the
kernel gradient's summation order differs (float32 accumulation). It takes the products where
they measured faster: 1 x 1 kernels, and larger kernels on >= 256 input channels (with fewer
channels XLA's own kernel gradient was up to 2x faster: the slices' copies cost more than the
products save). The products run on the CPU only (``lax.platform_dependent``): GPUs and TPUs
keep their libraries' kernel gradient. Every other call (layouts other than NHWC / HWIO, grouped
convolutions, input dilation) is ``lax.conv_general_dilated`` itself.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax

MIN_CHANNELS_FOR_PRODUCTS = 256  # input channels from which a k x k kernel (k > 1) takes them


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
  """``lax.conv_general_dilated`` (same arguments, same forward value); see the module doc.

  lhs: (N, H, W, C) input; rhs: (KH, KW, C, O) kernel; dimension_numbers must name these
  layouts (``('NHWC', 'HWIO', 'NHWC')``, as flax passes them) for the matrix-product gradient.
  """
  products = (lhs.ndim == 4 and feature_group_count == 1 and batch_group_count == 1
              and (lhs_dilation is None or all(d == 1 for d in lhs_dilation))
              and preferred_element_type is None
              and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
              == lax.conv_dimension_numbers(lhs.shape, rhs.shape, ('NHWC', 'HWIO', 'NHWC'))
              and (rhs.shape[:2] == (1, 1) or rhs.shape[2] >= MIN_CHANNELS_FOR_PRODUCTS))
  if not products:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, batch_group_count,
                                    precision, preferred_element_type)
  strides = tuple(int(s) for s in window_strides)
  dilation = tuple(int(d) for d in rhs_dilation) if rhs_dilation is not None else (1, 1)
  if isinstance(padding, str):
    dilated_kernel = [(k - 1) * d + 1 for k, d in zip(rhs.shape[:2], dilation)]
    padding = lax.padtype_to_pads(lhs.shape[1:3], dilated_kernel, strides, padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  return _conv_nhwc(lhs, rhs, strides, pads, dilation, precision)


def kernel_grad_by_products(x, g, kernel_size, strides, pads, dilation, precision=None):
  """The kernel gradient of an NHWC / HWIO convolution as one matrix product per kernel position.

  x: (N, H, W, C) input; g: (N, OH, OW, O) output cotangent; kernel_size (KH, KW); strides,
  dilation: (h, w) ints; pads: ((top, bottom), (left, right)), negative values crop.
  Returns (KH, KW, C, O) in g's dtype (float32 accumulation).
  """
  n, oh, ow, o = g.shape
  c = x.shape[-1]
  x_pad = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
  g_rows = g.reshape(n * oh * ow, o)
  per_position = []
  for i in range(kernel_size[0]):
    for j in range(kernel_size[1]):
      top, left = i * dilation[0], j * dilation[1]
      seen = lax.slice(x_pad, (0, top, left, 0),
                       (n, top + (oh - 1) * strides[0] + 1, left + (ow - 1) * strides[1] + 1, c),
                       (1, strides[0], strides[1], 1))
      per_position.append(lax.dot_general(
          seen.reshape(n * oh * ow, c), g_rows, (((0,), (0,)), ((), ())), precision=precision,
          preferred_element_type=jnp.float32))
  return jnp.stack(per_position).reshape(*kernel_size, c, o).astype(g.dtype)


def _lax_conv(x, w, strides, pads, dilation, precision):
  return lax.conv_general_dilated(x, w, strides, pads, rhs_dilation=dilation,
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv_nhwc(x, w, strides, pads, dilation, precision):
  return _lax_conv(x, w, strides, pads, dilation, precision)


def _conv_nhwc_fwd(x, w, strides, pads, dilation, precision):
  return _lax_conv(x, w, strides, pads, dilation, precision), (x, w)


def _conv_nhwc_bwd(strides, pads, dilation, precision, residuals, g):
  x, w = residuals
  (dx,) = jax.linear_transpose(lambda x: _lax_conv(x, w, strides, pads, dilation, precision), x)(g)
  by_products = lambda g: kernel_grad_by_products(x, g, w.shape[:2], strides, pads, dilation,
                                                  precision).astype(w.dtype)
  by_lax = lambda g: jax.linear_transpose(
      lambda w: _lax_conv(x, w, strides, pads, dilation, precision), w)(g)[0]
  return dx, lax.platform_dependent(g, cpu=by_products, default=by_lax)


_conv_nhwc.defvjp(_conv_nhwc_fwd, _conv_nhwc_bwd)
