"""mmcv's `ModulatedDeformConv2dPack` (DCNv2) as a Flax Linen module, NHWC.

A convolution whose 3x3 (generally: kh x kw, same stride / padding / dilation) sampling grid is
shifted per output pixel by learned offsets and weighted by a learned mask.  A plain conv,
``conv_offset``, zero-initialised, predicts ``deform_groups * kh*kw * 3`` channels from the input;
as in mmcv its output splits into three equal chunks ``o1, o2, m``: the offsets are
``concat(o1, o2)`` (per deform group, per kernel point, a (dy, dx) pair) and the mask is
``sigmoid(m)``.  At initialisation the offsets are 0 and the mask 0.5, so the layer starts as a
plain conv at half strength, exactly as mmcv's.

Parameters and their mmcv / mmdetection names (``P`` is the module's prefix, e.g.
``bbox_head.cls_convs.0.conv`` in a NAS-FCOS checkpoint):

  ======================== ================================ ==================================
  flax                     torch                            conversion
  ======================== ================================ ==================================
  kernel (kh,kw,Cin/G,Co)  P.weight (Co, Cin/G, kh, kw)     transpose(2, 3, 1, 0)
  bias (Co,)               P.bias (Co,)                     as is (only with use_bias)
  conv_offset/kernel       P.conv_offset.weight             transpose(2, 3, 1, 0)
    (kh, kw, Cin, dg*K*3)    (dg*K*3, Cin, kh, kw)
  conv_offset/bias         P.conv_offset.bias (dg*K*3,)     as is
  ======================== ================================ ==================================

`params_from_torch` does this conversion.  NAS-FCOS's head DCN (256 -> 256, 3x3, padding 1,
deform_groups 2, bias) has 589,824 + 256 + 124,416 + 54 = 714,550 parameters in both.
"""
from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdet.models.layers.conv import Conv
from jaxdet.ops.deform_conv import deform_conv2d

IntPair = Union[int, Sequence[int]]


def _pair(v):
  return (v, v) if isinstance(v, int) else tuple(v)


def mmcv_uniform_init(fan_in):
  """mmcv's `ModulatedDeformConv2d.init_weights`: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) with
  ``fan_in = in_channels * kh * kw`` (all input channels, even when grouped)."""
  bound = 1.0 / np.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound,
                                                                  bound)


class ModulatedDeformConv2dPack(nn.Module):
  """DCNv2 with its own offset / mask predictor, as mmcv's `ModulatedDeformConv2dPack`.

  Attributes:
    features: output channels.
    kernel_size, strides, padding, dilation: ints or (h, w) pairs, as ``torch.nn.Conv2d``
      (symmetric zero padding; mmcv's default padding is 0).
    groups: grouped convolution of the deformable conv (``conv_offset`` is never grouped).
    deform_groups: the input channels split into this many groups with their own offsets/mask.
    use_bias: a bias on the deformable conv (mmcv's ``bias``; NAS-FCOS's head uses True).
    precision: for the matrix products (e.g. 'highest' to avoid TF32 on GPUs).
    dtype: computation dtype (None: that of the inputs and parameters).
    kernel_init: init of ``kernel`` (default: mmcv's uniform); ``bias_init`` zeros;
      ``conv_offset`` is always zero-initialised as in mmcv.

  Call: ``x (B, H, W, Cin)`` -> ``(B, Ho, Wo, features)``.
  """
  features: int
  kernel_size: IntPair = 3
  strides: IntPair = 1
  padding: IntPair = 0
  dilation: IntPair = 1
  groups: int = 1
  deform_groups: int = 1
  use_bias: bool = True
  precision: Any = None
  dtype: Optional[Any] = None
  kernel_init: Optional[Callable] = None
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    kh, kw = _pair(self.kernel_size)
    ph, pw = _pair(self.padding)
    cin = x.shape[-1]
    if cin % self.groups:
      raise ValueError(f"groups={self.groups} must divide the input channels {cin}")
    k = kh * kw
    dg = self.deform_groups
    out = Conv(dg * k * 3, (kh, kw), strides=_pair(self.strides),
               padding=((ph, ph), (pw, pw)), kernel_dilation=_pair(self.dilation),
               use_bias=True, kernel_init=nn.initializers.zeros,
               bias_init=nn.initializers.zeros, precision=self.precision, dtype=self.dtype,
               name="conv_offset")(x)
    # mmcv: o1, o2, mask = chunk(out, 3); offset = cat(o1, o2); mask = sigmoid(mask).
    offset, mask = out[..., :2 * dg * k], jax.nn.sigmoid(out[..., 2 * dg * k:])

    kernel_init = self.kernel_init or mmcv_uniform_init(cin * k)
    kernel = self.param("kernel", kernel_init, (kh, kw, cin // self.groups, self.features))
    if self.dtype is not None:
      x, offset, mask, kernel = (a.astype(self.dtype) for a in (x, offset, mask, kernel))
    y = deform_conv2d(x, offset, mask, kernel, stride=self.strides, padding=self.padding,
                      dilation=self.dilation, deform_groups=dg, groups=self.groups,
                      precision=self.precision)
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,))
      y = y + bias.astype(y.dtype)
    return y


def params_from_torch(state, prefix=""):
  """Flax params of `ModulatedDeformConv2dPack` from an mmcv state dict.

  Args:
    state: mapping of torch names to arrays (``torch.Tensor`` or numpy), e.g. a checkpoint's
      ``state_dict``; the keys ``{prefix}weight``, ``{prefix}conv_offset.weight``,
      ``{prefix}conv_offset.bias`` and, when present, ``{prefix}bias`` are read.
    prefix: e.g. ``"bbox_head.cls_convs.0.conv."`` (with the trailing dot).

  Returns:
    ``{"kernel", ["bias",] "conv_offset": {"kernel", "bias"}}`` as float32 numpy arrays.
  """
  def get(name):
    key = prefix + name
    if key not in state:
      raise ValueError(f"missing {key!r} in the torch state dict")
    value = state[key]
    value = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
    return value.astype(np.float32)

  params = {
      "kernel": get("weight").transpose(2, 3, 1, 0),
      "conv_offset": {"kernel": get("conv_offset.weight").transpose(2, 3, 1, 0),
                      "bias": get("conv_offset.bias")},
  }
  if prefix + "bias" in state:
    params["bias"] = get("bias")
  return params
