"""Modulated deformable convolution (DCNv2) and DCNv1 in pure jnp.

``deform_conv2d`` computes what ``torchvision.ops.deform_conv2d`` and mmcv's
``modulated_deform_conv2d`` compute, in NHWC, with nothing to compile: it runs, jits
and differentiates on CPU, GPU and TPU.

For output pixel ``(ho, wo)``, kernel point ``(i, j)`` and deform group ``g``, the input
is read at the fractional position::

    y = ho * stride_h - pad_h + i * dilation_h + offset[b, ho, wo, g*2*K + 2*(i*kw + j)]
    x = wo * stride_w - pad_w + j * dilation_w + offset[b, ho, wo, g*2*K + 2*(i*kw + j) + 1]

(``K = kh * kw``), i.e. the offset channels hold, per deform group, per kernel point
(row-major), a ``(dy, dx)`` pair -- the layout of mmcv and torchvision, so converted
weights of the layer predicting the offsets work unchanged.  The sample is bilinear with
zeros outside the input: each of the 4 neighbouring pixels that lies outside contributes
zero, so a sample at ``y <= -1`` or ``y >= H`` (same for x) is 0.  It is multiplied by
``mask[b, ho, wo, g*K + i*kw + j]`` and then by the kernel as in a convolution;
input channel ``c`` belongs to deform group ``c // (Cin // deform_groups)``.

Gradients match torchvision's kernels: the gradient w.r.t. a position is the one-sided
(floor-based) derivative of the bilinear interpolation, so at an exactly integer position it
is the forward difference ``v[y0 + 1] - v[y0]``.  At exactly ``y == -1`` (or ``x == -1``)
that is the interpolated row (column) 0, where mmcv's CUDA kernel returns 0 instead: with zero
offsets and padding 1 the top row / left column of kernel points sits there, so the offset
gradients of the border pixels differ from mmcv's while the offsets are still exactly zero.
The op has a custom VJP: reverse mode (grad, vjp) only, no forward mode (jvp).

Memory.  Both passes loop (``lax.scan``) over the ``kh * kw`` kernel points; the full im2col
matrix ``(B, Ho, Wo, kh*kw*Cin)`` is never built.  Forward, per point: the 4 bilinear
neighbours of every sample are gathered and summed into one ``(B, Ho, Wo, Cin)`` column block
(1 / (kh*kw) of im2col), which is multiplied with that point's ``(Cin, Cout)`` kernel slice
and accumulated into the output.  Only the inputs are saved for the backward pass, which
recomputes the samples: a first scan rebuilds each column block for the kernel gradient; a
second computes each point's column gradient ``(B, Ho, Wo, Cin)`` and then, corner by corner
(inner scans), gathers the corner's values to reduce against it (offset and mask gradients)
and scatter-adds it, weighted, into the input gradient.  So besides the inputs, outputs and
gradient accumulators at most about two ``(B, Ho, Wo, Cin)`` blocks are alive; the 4 corners
are never kept.  At NAS-FCOS head sizes (B 2, 100x152, 256 -> 256, 3x3; one block is 30 MiB)
XLA's CPU compiler reports 68 MiB of scratch for the forward and 75 MiB for forward + backward
(experiments/bench_deform_conv.py), against 267 MiB for the im2col matrix.

Small calls (``all_points``): when ``9 * kh*kw * B*Ho*Wo*Cin`` elements fit in ``ALL_POINTS_BYTES``
(64 MiB), the same per-point functions run vmapped over all kernel points at once (one gather,
one matrix product, one scatter-add per pass) instead of the scan, whose per-iteration overhead
dominated at the 160 px smoke sizes. The residuals are still the inputs only: the larger
transient lives within one pass and nothing im2col-sized is kept for the backward pass.
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


# Below this many bytes of transient buffers a call processes all kernel points at once (the
# 160 px smoke sizes: ~33 MiB at 8 x 20 x 20 x 32); above, one point at a time.
ALL_POINTS_BYTES = 64 * 2**20


class _Config(NamedTuple):
  """Static configuration of one deformable convolution (hashable for custom_vjp)."""
  stride: tuple
  padding: tuple
  dilation: tuple
  groups: int
  deform_groups: int
  precision: object
  all_points: bool = False


def _pair(value, name):
  if isinstance(value, int) and not isinstance(value, bool):
    value = (value, value)
  value = tuple(value)
  if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
    raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
  return value


def output_size(size, kernel_size, stride, padding, dilation):
  """Output length of a convolution along one axis (as ``torch.nn.Conv2d``)."""
  return (size + 2 * padding - (dilation * (kernel_size - 1) + 1)) // stride + 1


def deform_conv2d(x, offset, mask, kernel, *, stride=1, padding=1, dilation=1, deform_groups=1,
                  groups=1, precision=None, all_points=None):
  """Modulated deformable convolution (DCNv2; DCNv1 when ``mask`` is None), no bias.

  Args:
    x: ``(B, H, W, Cin)`` input, NHWC.
    offset: ``(B, Ho, Wo, deform_groups * kh * kw * 2)`` offsets in input pixels; channel
      ``g * 2*kh*kw + 2 * (i*kw + j) + {0: dy, 1: dx}`` (mmcv / torchvision layout).
    mask: ``(B, Ho, Wo, deform_groups * kh * kw)`` modulation in [0, 1] (channel
      ``g * kh*kw + i*kw + j``), or None for DCNv1 (a mask of ones).
    kernel: ``(kh, kw, Cin // groups, Cout)`` (HWIO, as ``flax.linen.Conv``).
    stride, padding, dilation: ints or ``(h, w)`` pairs; padding is symmetric zeros.
    deform_groups: the input channels split into this many groups, each with its own offsets
      and mask.
    groups: ordinary grouped convolution (``Cin`` and ``Cout`` divisible by it).
    precision: passed to the matrix products (``jax.lax.Precision``), e.g. ``'highest'``
      to avoid TF32 / bf16 passes on accelerators.
    all_points: True: all ``kh * kw`` kernel points at once (one gather, one matrix product,
      one scatter; transient memory ~``9 * kh*kw * B*Ho*Wo*Cin`` elements, nothing of it kept
      for the backward pass); False: one point at a time (``lax.scan``, the bound in the module
      docstring); None (default): all at once when that transient is at most
      ``ALL_POINTS_BYTES`` (64 MiB), else one at a time. Same sums up to float rounding order.

  Returns:
    ``(B, Ho, Wo, Cout)``, ``Ho = (H + 2*pad_h - dilation_h*(kh-1) - 1) // stride_h + 1``.
  """
  stride = _pair(stride, "stride")
  padding = _pair(padding, "padding")
  dilation = _pair(dilation, "dilation")
  if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
    raise ValueError(f"need stride >= 1, dilation >= 1, padding >= 0; got stride={stride}, "
                     f"dilation={dilation}, padding={padding}")
  x = jnp.asarray(x)
  offset = jnp.asarray(offset)
  kernel = jnp.asarray(kernel)
  if x.ndim != 4:
    raise ValueError(f"x must be (B, H, W, Cin), got shape {x.shape}")
  if kernel.ndim != 4:
    raise ValueError(f"kernel must be (kh, kw, Cin // groups, Cout), got shape {kernel.shape}")
  b, h, w, cin = x.shape
  kh, kw, cin_per_group, cout = kernel.shape
  if groups < 1 or cin % groups or cout % groups:
    raise ValueError(f"groups={groups} must divide Cin={cin} and Cout={cout}")
  if cin_per_group * groups != cin:
    raise ValueError(f"kernel shape {kernel.shape} needs Cin // groups = {cin // groups} input "
                     f"channels (x has Cin={cin}, groups={groups})")
  if deform_groups < 1 or cin % deform_groups:
    raise ValueError(f"deform_groups={deform_groups} must divide Cin={cin}")
  ho = output_size(h, kh, stride[0], padding[0], dilation[0])
  wo = output_size(w, kw, stride[1], padding[1], dilation[1])
  if ho < 1 or wo < 1:
    raise ValueError(f"input {h}x{w} too small for kernel {kh}x{kw} with padding {padding}, "
                     f"dilation {dilation}: output would be {ho}x{wo}")
  k = kh * kw
  if offset.shape != (b, ho, wo, deform_groups * k * 2):
    raise ValueError(f"offset must have shape {(b, ho, wo, deform_groups * k * 2)} "
                     f"(B, Ho, Wo, deform_groups*kh*kw*2), got {offset.shape}")
  if mask is None:
    mask = jnp.ones((b, ho, wo, deform_groups * k), x.dtype)
  mask = jnp.asarray(mask)
  if mask.shape != (b, ho, wo, deform_groups * k):
    raise ValueError(f"mask must have shape {(b, ho, wo, deform_groups * k)} "
                     f"(B, Ho, Wo, deform_groups*kh*kw), got {mask.shape}")
  for name, arr in (("x", x), ("offset", offset), ("mask", mask), ("kernel", kernel)):
    if not jnp.issubdtype(arr.dtype, jnp.floating):
      raise ValueError(f"{name} must be floating point, got {arr.dtype}")
  if all_points is None:
    itemsize = jnp.result_type(x.dtype, kernel.dtype).itemsize
    all_points = 9 * k * b * ho * wo * cin * max(itemsize, 4) <= ALL_POINTS_BYTES
  config = _Config(stride, padding, dilation, groups, deform_groups, precision, bool(all_points))
  return _deform_conv_jit(config, x, offset, mask, kernel)


# ---------------------------------------------------------------------------------------
# Implementation.  Inside, n = B*Ho*Wo; dg deform groups of cg = Cin // dg channels each;
# x is viewed as rows of cg channels, row = ((b*H + y)*W + x)*dg + g, so that one bilinear
# neighbour of one sample of one deform group is one contiguous row.  Everything loops over
# the K = kh*kw kernel points ("points") with lax.scan.


def _points(config, offset, mask, kernel):
  """Per kernel point: (dy0, dx0) kernel displacements (K,), offsets (K, B, Ho, Wo, dg, 2)
  float32, mask (K, B, Ho, Wo, dg) and kernel slices (K, G, Cin/G, Cout/G)."""
  b, ho, wo, _ = offset.shape
  kh, kw, cin_g, cout = kernel.shape
  dg, g, k = config.deform_groups, config.groups, kh * kw
  ii, jj = jnp.meshgrid(jnp.arange(kh), jnp.arange(kw), indexing="ij")
  dy0 = (ii.reshape(k) * config.dilation[0]).astype(jnp.float32)
  dx0 = (jj.reshape(k) * config.dilation[1]).astype(jnp.float32)
  off = jnp.moveaxis(offset.reshape(b, ho, wo, dg, k, 2), 4, 0).astype(jnp.float32)
  msk = jnp.moveaxis(mask.reshape(b, ho, wo, dg, k), 4, 0)
  kern = kernel.reshape(k, cin_g, g, cout // g).transpose(0, 2, 1, 3)
  return dy0, dx0, off, msk, kern


def _corners(config, x_shape, out_hw, point):
  """The 4 bilinear neighbours of every sample of one kernel point.

  Returns ``rows (4, B, Ho, Wo, dg)`` int32 row indices (clamped into range), ``valid (4,
  ...)`` whether the neighbour lies inside the image, ``weights (4, ...)`` float32 bilinear
  weights with out-of-image neighbours zeroed, and the fractional parts ``(ly, lx)``.
  Corner order: (y0, x0), (y0, x0+1), (y0+1, x0), (y0+1, x0+1).
  """
  b, h, w, _ = x_shape
  ho, wo = out_hw
  dy0, dx0, off, _, _ = point
  oy = (jnp.arange(ho) * config.stride[0] - config.padding[0]).astype(jnp.float32)
  ox = (jnp.arange(wo) * config.stride[1] - config.padding[1]).astype(jnp.float32)
  py = oy[:, None, None] + dy0 + off[..., 0]  # (B, Ho, Wo, dg)
  px = ox[None, :, None] + dx0 + off[..., 1]
  y0, x0 = jnp.floor(py), jnp.floor(px)
  ly, lx = py - y0, px - x0
  y0, x0 = y0.astype(jnp.int32), x0.astype(jnp.int32)
  base = jnp.arange(b, dtype=jnp.int32)[:, None, None, None] * h
  group = jnp.arange(config.deform_groups, dtype=jnp.int32)
  rows, valid, weights = [], [], []
  for cy, cx in ((0, 0), (0, 1), (1, 0), (1, 1)):
    yy, xx = y0 + cy, x0 + cx
    inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    pixel = (base + jnp.clip(yy, 0, h - 1)) * w + jnp.clip(xx, 0, w - 1)
    rows.append(pixel * config.deform_groups + group)
    valid.append(inside)
    weights.append(jnp.where(inside, (ly if cy else 1 - ly) * (lx if cx else 1 - lx), 0.0))
  # The barrier keeps XLA from fusing this index arithmetic into the gathers, where it
  # would be recomputed for every channel (about 10x slower on CPU).
  return lax.optimization_barrier(
      (jnp.stack(rows), jnp.stack(valid), jnp.stack(weights), (ly, lx)))


def _gather(xrows, rows):
  """``xrows (R, cg)`` at ``rows (B, Ho, Wo, dg)`` -> ``(B, Ho, Wo, dg, cg)``."""
  return xrows.at[rows].get(mode="promise_in_bounds")


def _columns(xrows, rows, weights, msk):
  """The masked bilinear samples of one kernel point, ``(B, Ho, Wo, dg, cg)``."""
  wts = (weights * msk[None].astype(weights.dtype)).astype(xrows.dtype)
  return sum(wts[c][..., None] * _gather(xrows, rows[c]) for c in range(4))


def _grouped_dot(spec, a, b, precision):
  """``einsum(spec, a, b)`` where ``g`` is the conv-group axis; with one group, a plain 2-D
  dot (XLA's CPU dot with a size-1 batch axis is several times slower)."""
  if a.shape[spec.split(",")[0].index("g")] > 1:
    return jnp.einsum(spec, a, b, precision=precision)
  (lhs, rhs), out = spec.split("->")[0].split(","), spec.split("->")[1]
  drop = lambda t, labels: jnp.squeeze(t, labels.index("g"))
  res = jnp.einsum(spec.replace("g", ""), drop(a, lhs), drop(b, rhs), precision=precision)
  return jnp.expand_dims(res, out.index("g"))


def _forward(config, x, offset, mask, kernel):
  if config.all_points:
    return _forward_all_points(config, x, offset, mask, kernel)
  b, h, w, cin = x.shape
  _, ho, wo, _ = offset.shape
  g = config.groups
  xrows = x.reshape(-1, cin // config.deform_groups)

  def step(out, point):
    rows, _, weights, _ = _corners(config, x.shape, (ho, wo), point)
    cols = _columns(xrows, rows, weights, point[3]).reshape(b * ho * wo, g, cin // g)
    out_k = _grouped_dot("ngc,gco->ngo", cols, point[4], config.precision)
    return out + out_k.reshape(out.shape).astype(out.dtype), None

  out = jnp.zeros((b, ho, wo, kernel.shape[-1]), jnp.result_type(x.dtype, kernel.dtype))
  out, _ = lax.scan(step, out, _points(config, offset, mask, kernel))
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _deform_conv(config, x, offset, mask, kernel):
  return _forward(config, x, offset, mask, kernel)


def _deform_conv_fwd(config, x, offset, mask, kernel):
  # The residuals are the inputs only: the backward pass recomputes the samples.
  return _forward(config, x, offset, mask, kernel), (x, offset, mask, kernel)


def _deform_conv_bwd(config, residuals, grad_out):
  x, offset, mask, kernel = residuals
  b, _, _, cin = x.shape
  _, ho, wo, _ = offset.shape
  g, cout = config.groups, kernel.shape[-1]
  xrows = x.reshape(-1, cin // config.deform_groups)
  grad_out = grad_out.astype(jnp.result_type(x.dtype, kernel.dtype))
  grad_out = grad_out.reshape(b * ho * wo, g, cout // g)
  backward = _backward_all_points if config.all_points else _backward_by_point
  grad_xrows, grad_off, grad_msk, grad_kern = backward(config, x, offset, mask, kernel, xrows,
                                                       grad_out)
  grad_x = grad_xrows.reshape(x.shape)
  # (K, B, Ho, Wo, dg, 2) -> (B, Ho, Wo, dg, K, 2) is the offset channel layout; same for mask.
  grad_offset = jnp.moveaxis(grad_off, 0, 4).reshape(offset.shape).astype(offset.dtype)
  grad_mask = jnp.moveaxis(grad_msk, 0, 4).reshape(mask.shape).astype(mask.dtype)
  # (K, G, Cin/G, Cout/G) -> (kh, kw, Cin/G, Cout).
  grad_kernel = grad_kern.transpose(0, 2, 1, 3).reshape(kernel.shape).astype(kernel.dtype)
  return grad_x, grad_offset, grad_mask, grad_kernel


def _position_grads(a, weights, msk, ly, lx):
  """Offset (..., 2) and mask gradients of one or all points from ``a[c]`` = <column gradient,
  value at corner c> (corner axis first).  d sample / d y = (1 - lx) (v[y0+1, x0] - v[y0, x0])
  + lx (v[y0+1, x0+1] - v[y0, x0+1]): the floor-based one-sided derivative, as torchvision's."""
  grad_dy = msk * ((1 - lx) * (a[2] - a[0]) + lx * (a[3] - a[1]))
  grad_dx = msk * ((1 - ly) * (a[1] - a[0]) + ly * (a[3] - a[2]))
  return jnp.stack([grad_dy, grad_dx], axis=-1), jnp.sum(weights * a, axis=0)


def _backward_by_point(config, x, offset, mask, kernel, xrows, grad_out):
  """Gradients w.r.t. the input rows, per-point offsets / mask and kernel, one point at a time."""
  b, h, w, cin = x.shape
  _, ho, wo, _ = offset.shape
  dg, g = config.deform_groups, config.groups
  cg = cin // dg
  points = _points(config, offset, mask, kernel)

  # Two passes over the kernel points so that the column block (needed for the kernel
  # gradient) and the column gradient are never alive together; XLA's CPU scheduler would
  # otherwise compute both up front.  Pass 1: kernel gradient.
  def kernel_step(carry, point):
    rows, _, weights, _ = _corners(config, x.shape, (ho, wo), point)
    cols = _columns(xrows, rows, weights, point[3]).reshape(b * ho * wo, g, cin // g)
    return carry, _grouped_dot("ngc,ngo->gco", cols, grad_out, config.precision)

  _, grad_kern = lax.scan(kernel_step, None, points)

  # Pass 2: gradients of the input, offsets and mask from the column gradient.
  def input_step(grad_xrows, point):
    rows, valid, weights, (ly, lx) = _corners(config, x.shape, (ho, wo), point)
    msk = point[3].astype(jnp.float32)
    grad_cols = _grouped_dot("ngo,gco->ngc", grad_out, point[4], config.precision)
    grad_cols = grad_cols.reshape(b, ho, wo, dg, cg).astype(x.dtype)

    # Inner loops over the 4 corners keep one (B, Ho, Wo, Cin) block alive beside grad_cols:
    # a[c] = <grad_cols, value at corner c> per sample; then grad_cols * weight is scattered
    # to corner c of the input gradient.
    def corner_dot(carry, rows_c):
      return carry, jnp.sum(grad_cols * _gather(xrows, rows_c), axis=-1, dtype=jnp.float32)

    def corner_scatter(grad_xrows, corner):
      rows_c, wts_c = corner
      update = wts_c[..., None] * grad_cols
      return grad_xrows.at[rows_c].add(update, mode="promise_in_bounds"), None

    _, a = lax.scan(corner_dot, None, rows)
    a = jnp.where(valid, a, 0.0)  # out-of-image neighbours read as 0
    wts = (weights * msk[None]).astype(x.dtype)
    grad_xrows, _ = lax.scan(corner_scatter, grad_xrows, (rows, wts))
    return grad_xrows, _position_grads(a, weights, msk, ly, lx)

  grad_xrows, (grad_off, grad_msk) = lax.scan(input_step, jnp.zeros_like(xrows), points)
  return grad_xrows, grad_off, grad_msk, grad_kern


# All kernel points at once: the per-point functions above, vmapped over the point axis.
# At small sizes the per-point loop is mostly loop overhead on CPU (a NAS-FCOS smoke step at
# 160 px spent ~60% of its time in the DCNs' scans, experiments/README.md).


def _samples_all_points(config, x, offset, mask, kernel):
  """Points, corners (each with a leading K axis) and the column blocks (K, B*Ho*Wo, G, Cin/G)."""
  b, _, _, cin = x.shape
  _, ho, wo, _ = offset.shape
  points = _points(config, offset, mask, kernel)
  corners = jax.vmap(lambda p: _corners(config, x.shape, (ho, wo), p))(points)
  xrows = x.reshape(-1, cin // config.deform_groups)
  cols = jax.vmap(lambda r, w, m: _columns(xrows, r, w, m))(corners[0], corners[2], points[3])
  return points, corners, cols.reshape(-1, b * ho * wo, config.groups, cin // config.groups)


def _forward_all_points(config, x, offset, mask, kernel):
  b, _, _, _ = x.shape
  _, ho, wo, _ = offset.shape
  points, _, cols = _samples_all_points(config, x, offset, mask, kernel)
  out = jnp.einsum("kngc,kgco->ngo", cols, points[4], precision=config.precision)
  return out.reshape(b, ho, wo, kernel.shape[-1]).astype(jnp.result_type(x.dtype, kernel.dtype))


def _backward_all_points(config, x, offset, mask, kernel, xrows, grad_out):
  """As `_backward_by_point`, all points at once (leading K axis on every per-point array)."""
  b, _, _, cin = x.shape
  _, ho, wo, _ = offset.shape
  dg, cg = config.deform_groups, cin // config.deform_groups
  points, (rows, valid, weights, (ly, lx)), cols = _samples_all_points(
      config, x, offset, mask, kernel)
  k = rows.shape[0]
  grad_kern = jnp.einsum("kngc,ngo->kgco", cols, grad_out, precision=config.precision)
  grad_cols = jnp.einsum("ngo,kgco->kngc", grad_out, points[4], precision=config.precision)
  grad_cols = grad_cols.reshape(k, 1, b, ho, wo, dg, cg).astype(x.dtype)   # (K, corner, ...)
  msk = points[3].astype(jnp.float32)                                       # (K, B, Ho, Wo, dg)
  a = jnp.sum(grad_cols * _gather(xrows, rows), axis=-1, dtype=jnp.float32)  # (K, 4, ...)
  a = jnp.where(valid, a, 0.0)
  update = (weights * msk[:, None]).astype(x.dtype)[..., None] * grad_cols
  grad_xrows = jnp.zeros_like(xrows).at[rows.reshape(-1)].add(
      update.reshape(-1, cg), mode="promise_in_bounds")
  grad_off, grad_msk = jax.vmap(_position_grads)(a, weights, msk, ly, lx)
  return grad_xrows, grad_off, grad_msk, grad_kern


_deform_conv.defvjp(_deform_conv_fwd, _deform_conv_bwd)
# Jitted so that eager (un-jitted) calls compile once per shape instead of op by op; inside an
# outer jit this is inlined.
_deform_conv_jit = jax.jit(_deform_conv, static_argnums=0)
