"""NAS-FCOS's searched FPN (Wang et al. 2020) as mmdetection 3.3's `NASFCOS_FPN`, NHWC.

Inputs: the backbone's 4 maps (C2, C3, C4, C5); C2 is not used (start_level 1). Wiring, as
mmdetection's `forward` (f0, f1, f2 = the adapted C3, C4, C5; each cell appends one map):

  f0..f2 = adapt_convs_i(C3..C5)          1x1 conv (no bias) -> BN -> ReLU, 256 channels
  f3 = c22_1(f2, f2)     f4 = c22_2(f2, f2)     f5 = c32(f3, f2)     f6 = c02(f0, f2)
  f7 = c42(f4, f2)       f8 = c36(f3, f6)       f9 = c61(f6, f1)
  P3 = resize(f9 + resize(f5, f9), C3)    P4 = resize(f8 + resize(f5, f8), C4)
  P5 = resize(f7 + resize(f5, f7), C5)    (resize: bilinear, align_corners=False)
  P6 = extra_downsamples_0(P5)            3x3 stride-2 conv with bias
  P7 = extra_downsamples_1(relu(P6))      (num_outs - 3 extra levels)

A cell (mmcv's `ConcatCell`): optional input convs (DCNv2 3x3 with bias, deform_groups 2 ->
BN -> ReLU) on each input (`c32` and `c02` have none on their second input); both resized to
the lexicographically larger (H, W) of the two inputs (mmcv compares `torch.Size` tuples:
smaller -> nearest upsampling, larger -> zero-padded max pooling); concatenated (x1 first); then
`out_conv`: BN over the 512 channels -> ReLU -> grouped 1x1 conv (groups 256, no bias: output
channel k mixes concatenated channels 2k and 2k+1).

BatchNorm is torch's `BatchNorm2d` (trained): batch statistics when `train=True` (biased
variance to normalise, the unbiased one into the running variance, momentum 0.1), running
statistics otherwise. Initialisation as mmdetection's: adapt and extra convs caffe2-xavier
(uniform, bound sqrt(3 / fan_in)), biases 0; the cells' out convs kaiming normal (fan_out,
relu) as mmcv's `ConvModule`; the DCNs mmcv's (uniform 1/sqrt(fan_in), offsets 0); BN 1 / 0.

At mmdetection's size (in 256/512/1024/2048, 256 channels, 5 outputs) it has 10,690,696
parameters, as mmdetection's. Parameter names follow mmdetection's (`TORCH_NAMES`).
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdet.models.layers.conv import Conv
from jaxdet.models.layers.deform_conv_group import DeformConvWeights, grouped_deform_conv
from jaxdet.models.registry import NECKS, Part

# mmdetection's cells in creation (= execution) order: name -> (with_input1_conv,
# with_input2_conv); the digits of the name index the two inputs in the growing feature list.
CELLS = (('c22_1', True, True), ('c22_2', True, True), ('c32', True, False),
         ('c02', True, False), ('c42', True, True), ('c36', True, True), ('c61', True, True))

caffe2_xavier = nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform')
kaiming_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


# ------------------------------------------------------------------------ torch-exact resizing

def _nearest_index(in_size, out_size):
  """torch's `F.interpolate(mode='nearest', size=...)` source indices along one axis (CPU:
  float32 scale in / out, floor(dst * scale), clamped; exact for equal and doubled sizes)."""
  if in_size == out_size:
    return np.arange(out_size)
  if out_size == 2 * in_size:
    return np.arange(out_size) >> 1
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(src, in_size - 1)


def _bilinear_weights(in_size, out_size):
  """torch's bilinear `align_corners=False` along one axis: indices i0, i1 and weights l0, l1
  (float32 as torch's CPU kernel: src = max(scale * (dst + 0.5) - 0.5, 0))."""
  scale = np.float32(in_size) / np.float32(out_size)
  src = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
  src = np.maximum(src, np.float32(0))
  i0 = src.astype(np.int64)
  i1 = i0 + (i0 < in_size - 1)
  l1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
  return i0, i1, (np.float32(1) - l1), l1


def resize_nearest(x, size):
  """(B, H, W, C) -> (B, size[0], size[1], C), torch's nearest interpolation."""
  ys = _nearest_index(x.shape[1], size[0])
  xs = _nearest_index(x.shape[2], size[1])
  return x[:, ys][:, :, xs]


def resize_bilinear(x, size):
  """(B, H, W, C) -> (B, size[0], size[1], C), torch's bilinear, align_corners=False, no
  antialiasing (separable: rows, then columns)."""
  if tuple(x.shape[1:3]) == tuple(size):
    return x
  y0, y1, wy0, wy1 = _bilinear_weights(x.shape[1], size[0])
  x0, x1, wx0, wx1 = _bilinear_weights(x.shape[2], size[1])
  dt = x.dtype
  x = x[:, y0] * wy0.astype(dt)[:, None, None] + x[:, y1] * wy1.astype(dt)[:, None, None]
  return x[:, :, x0] * wx0.astype(dt)[:, None] + x[:, :, x1] * wx1.astype(dt)[:, None]


def resize_like_merge_cell(x, size):
  """mmcv `BaseMergeCell._resize`: same size as is; (H, W) < size (lexicographic, as torch.Size
  compares) -> nearest; else zero-pad (centred) to multiples of size and max-pool by the
  ratio."""
  h, w = x.shape[1:3]
  size = tuple(size)
  if (h, w) == size:
    return x
  if (h, w) < size:
    return resize_nearest(x, size)
  th, tw = size
  if h % th or w % tw:
    pad_h, pad_w = -(-h // th) * th - h, -(-w // tw) * tw - w
    x = jnp.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2),
                    (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
  kh, kw = x.shape[1] // th, x.shape[2] // tw
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, kh, kw, 1), (1, kh, kw, 1), 'VALID')


# ------------------------------------------------------------------------------------- layers

class BatchNorm(nn.Module):
  """torch's `BatchNorm2d` over the last axis: `train` normalises with the batch's mean and
  biased variance and moves the running mean / unbiased variance by `momentum` (torch's
  convention: new = (1 - momentum) old + momentum batch); otherwise the running statistics.
  Variables as flax's BatchNorm: params scale / bias, batch_stats mean / var (float32)."""
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,))
    bias = self.param('bias', nn.initializers.zeros, (c,))
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
    if train:
      xf = x.astype(jnp.float32)
      mean = xf.mean(axis=(0, 1, 2))
      var = jnp.square(xf - mean).mean(axis=(0, 1, 2))
      if not self.is_initializing():
        n = x.size // c
        m = self.momentum
        ra_mean.value = (1 - m) * ra_mean.value + m * jax.lax.stop_gradient(mean)
        ra_var.value = (1 - m) * ra_var.value + m * jax.lax.stop_gradient(var) * (
            n / max(n - 1, 1))
    else:
      mean, var = ra_mean.value, ra_var.value
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    dt = self.dtype or x.dtype
    return (x.astype(dt) * mul.astype(dt) + (bias - mean * mul).astype(dt))


class ConvBNReLU(nn.Module):
  """mmcv `ConvModule(conv, BN, ReLU)` with a plain conv (kernel `kernel_size`, no bias): the
  adapt convs."""
  features: int
  kernel_size: int = 1
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    p = self.kernel_size // 2
    x = Conv(self.features, (self.kernel_size,) * 2, padding=((p, p), (p, p)),
             use_bias=False, kernel_init=caffe2_xavier, dtype=self.dtype, name='conv')(x)
    return nn.relu(BatchNorm(dtype=self.dtype, name='bn')(x, train))


class _InputConv(nn.Module):
  """A cell's input conv, mmcv `ConvModule(DCNv2 3x3 with bias, BN, ReLU)`: `conv` holds the
  DCN's parameters (run grouped with others by the FPN, see `grouped_deform_conv`); `post`
  applies BN -> ReLU to its output."""
  features: int
  deform_groups: int = 2
  dtype: Optional[Any] = None

  def setup(self):
    self.conv = DeformConvWeights(self.features, self.features, 3, self.deform_groups,
                                  use_bias=True, dtype=self.dtype)
    self.bn = BatchNorm(dtype=self.dtype)

  def post(self, y, train: bool = False):
    return nn.relu(self.bn(y, train))

  def __call__(self, x, train: bool = False):
    return self.post(self.conv(x), train)


class ConcatCell(nn.Module):
  """mmcv's `ConcatCell` as NAS-FCOS builds it (see the module docstring). `__call__` runs it
  alone; the FPN instead runs the input convs (`input_convs`) grouped across cells, then
  `merge`."""
  features: int = 256
  with_input1_conv: bool = True
  with_input2_conv: bool = True
  deform_groups: int = 2
  dtype: Optional[Any] = None

  def setup(self):
    conv = lambda: _InputConv(self.features, self.deform_groups, self.dtype)
    self.input1_conv = conv() if self.with_input1_conv else None
    self.input2_conv = conv() if self.with_input2_conv else None
    self.out_conv = _OutConv(self.features, self.dtype)

  def input_convs(self):
    return (self.input1_conv, self.input2_conv)

  def merge(self, x1, x2, out_size, train: bool = False):
    """Resize both (already input-conv'd) inputs to `out_size`, concatenate, out conv."""
    x = jnp.concatenate([resize_like_merge_cell(x1, out_size),
                         resize_like_merge_cell(x2, out_size)], axis=-1)
    return self.out_conv(x, train)

  def __call__(self, x1, x2, train: bool = False):
    out_size = max(tuple(x1.shape[1:3]), tuple(x2.shape[1:3]))
    xs = [conv(x, train) if conv is not None else x
          for conv, x in zip(self.input_convs(), (x1, x2))]
    return self.merge(*xs, out_size, train)


class _OutConv(nn.Module):
  """The cell's out conv, order (norm, act, conv): BN -> ReLU -> 1x1 conv, groups = features."""
  features: int
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(BatchNorm(dtype=self.dtype, name='bn')(x, train))
    return PairwiseConv1x1(self.features, dtype=self.dtype, name='conv')(x)


class PairwiseConv1x1(nn.Module):
  """``nn.Conv(features, (1, 1), feature_group_count=features, use_bias=False)`` on 2 x features
  input channels, computed as what it is: output channel g = x[2g] * w[0, g] + x[2g + 1] * w[1, g].
  Same parameter (``kernel``, (1, 1, 2, features), kaiming fan-out init) and the same numbers as the
  grouped conv (tests/test_nasfcos.py), but XLA:CPU lowers that conv's kernel gradient to a generic
  base-dilated convolution that took ~95 ms of a smoke step per cell (experiments/README.md)."""
  features: int
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x):
    if x.shape[-1] != 2 * self.features:
      raise ValueError(f'PairwiseConv1x1: expected {2 * self.features} input channels, '
                       f'got {x.shape[-1]}')
    kernel = self.param('kernel', kaiming_fan_out, (1, 1, 2, self.features))
    if self.dtype is not None:
      x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    pairs = x.reshape(*x.shape[:-1], self.features, 2)        # (..., g, j): input channel 2g + j
    return (pairs * kernel[0, 0].T).sum(-1)


class NASFCOS_FPN(nn.Module):  # pylint: disable=invalid-name  (mmdetection's name)
  """Input: the backbone's 4 maps (B, Hi, Wi, Ci), C2..C5; output: `num_outs` >= 3 maps of
  `out_channels`, P3 first (C3's size), then C4's, C5's, then stride-2 extra levels.

  The cells' 12 input DCNs run in waves: every input conv whose input exists runs, grouped by
  spatial size into one `grouped_deform_conv` call each (5 calls instead of 12; the same sums),
  then every cell whose inputs are ready merges; cells keep mmdetection's indices f3..f9.
  """
  out_channels: int = 256
  num_outs: int = 5
  start_level: int = 1
  deform_groups: int = 2
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, inputs: Sequence[jax.Array], train: bool = False):
    if self.start_level != 1 or len(inputs) != 4:
      raise ValueError(f'NASFCOS_FPN needs 4 backbone maps (C2..C5) and start_level 1, got '
                       f'{len(inputs)} maps and start_level={self.start_level}')
    if self.num_outs < 3:
      raise ValueError(f'NASFCOS_FPN num_outs={self.num_outs} must be >= 3 (P3-P5 + extras)')
    feats = {i: ConvBNReLU(self.out_channels, 1, dtype=self.dtype, name=f'adapt_convs_{i}')(
        inputs[i + self.start_level], train) for i in range(3)}
    cells = [(3 + n, ConcatCell(self.out_channels, c1, c2, self.deform_groups, self.dtype,
                                name=name), (int(name[1]), int(name[2])))
             for n, (name, c1, c2) in enumerate(CELLS)]
    conv_out = {}  # (cell index, input 0/1) -> the input after its conv (or as is)
    while len(feats) < 3 + len(cells):
      # every input conv whose input exists, grouped by spatial size: one DCN call per size
      jobs = {}
      for idx, cell, srcs in cells:
        for j, (conv, src) in enumerate(zip(cell.input_convs(), srcs)):
          if (idx, j) not in conv_out and src in feats:
            if conv is None:
              conv_out[(idx, j)] = feats[src]
            else:
              jobs.setdefault(tuple(feats[src].shape[:3]), []).append((idx, j, conv, src))
      for group in jobs.values():
        ys = grouped_deform_conv([conv.conv for _, _, conv, _ in group],
                                 [feats[src] for _, _, _, src in group], dtype=self.dtype)
        for (idx, j, conv, _), y in zip(group, ys):
          conv_out[(idx, j)] = conv.post(y, train)
      progressed = False
      for idx, cell, srcs in cells:
        if idx not in feats and (idx, 0) in conv_out and (idx, 1) in conv_out:
          out_size = max(tuple(feats[srcs[0]].shape[1:3]), tuple(feats[srcs[1]].shape[1:3]))
          feats[idx] = cell.merge(conv_out[(idx, 0)], conv_out[(idx, 1)], out_size, train)
          progressed = True
      if not progressed and not jobs:
        raise ValueError('NASFCOS_FPN: cell inputs that are never computed')  # not reachable
    outs = []
    for idx, input_idx in zip((9, 8, 7), (1, 2, 3)):  # P3, P4, P5
      summed = feats[idx] + resize_bilinear(feats[5], feats[idx].shape[1:3])
      outs.append(resize_bilinear(summed, inputs[input_idx].shape[1:3]))
    for i in range(self.num_outs - 3):
      x = outs[-1] if i == 0 else nn.relu(outs[-1])
      outs.append(Conv(self.out_channels, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                       kernel_init=caffe2_xavier, dtype=self.dtype,
                       name=f'extra_downsamples_{i}')(x))
    return tuple(outs)


def from_config(cfg, dtype=None):
  """The NAS-FCOS FPN of `config.model.neck` (type 'nasfcos_fpn')."""
  return NASFCOS_FPN(out_channels=cfg.out_channels, num_outs=cfg.num_outs,
                     start_level=cfg.get('start_level', 1),
                     deform_groups=cfg.get('deform_groups', 2), dtype=dtype)


# mmdetection's NASFCOS_FPN tensor names (relative to 'neck.') -> jaxdet module paths.
TORCH_NAMES = (
    (r'adapt_convs\.(\d+)\.(conv|bn)', r'adapt_convs_\1/\2'),
    (r'fpn\.(c\d\d(?:_\d)?)\.(input[12]_conv|out_conv)\.(conv|bn)', r'\1/\2/\3'),
    (r'fpn\.(c\d\d(?:_\d)?)\.(input[12]_conv)\.conv\.conv_offset', r'\1/\2/conv/conv_offset'),
    (r'extra_downsamples\.(\d+)\.conv', r'extra_downsamples_\1'),
)

NECKS.register('nasfcos_fpn', Part(build=from_config, torch_names=TORCH_NAMES))
