"""Several DCNv2 layers of one spatial size in ONE deformable-convolution call.

`DeformConvWeights` holds exactly the parameters of `ModulatedDeformConv2dPack` (same names:
``kernel``, ``bias``, ``conv_offset/{kernel,bias}``; same initialisation) and predicts its own
offsets and mask, but leaves the deformable convolution itself to `grouped_deform_conv`, which
runs G such layers, each on its own input of a common (B, H, W), as one
`jaxdet.ops.deform_conv.deform_conv2d` call: the inputs concatenated along channels, G conv
groups (group g reads input g with layer g's kernel), G * deform_groups deform groups (layer g's
offsets / mask channels concatenated in order, which is exactly their layout). The result is
the same sums as G separate calls; XLA compiles one deformable convolution (a scan with a
custom backward) instead of G, which is what dominates the compile time of a NAS-FCOS training
step on CPU (each DCN's forward + backward compiles in ~10-20 s there).
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdet.models.layers.conv import Conv
from jaxdet.models.layers.deform_conv import mmcv_uniform_init
from jaxdet.ops.deform_conv import deform_conv2d


class DeformConvWeights(nn.Module):
  """The parameters (and offset / mask predictor) of one mmcv `ModulatedDeformConv2dPack`
  (stride 1, symmetric padding ``kernel_size // 2``, no conv groups).

  Attributes: features (output channels), in_features, kernel_size, deform_groups, use_bias,
  dtype (computation dtype of the offset conv; None: that of the input).
  """
  features: int
  in_features: int
  kernel_size: int = 3
  deform_groups: int = 2
  use_bias: bool = True
  dtype: Optional[Any] = None

  def setup(self):
    k, p = self.kernel_size, self.kernel_size // 2
    self.conv_offset = Conv(self.deform_groups * k * k * 3, (k, k), padding=((p, p), (p, p)),
                            kernel_init=nn.initializers.zeros,
                            bias_init=nn.initializers.zeros, dtype=self.dtype)
    self.kernel = self.param('kernel', mmcv_uniform_init(self.in_features * k * k),
                             (k, k, self.in_features, self.features))
    if self.use_bias:
      self.bias = self.param('bias', nn.initializers.zeros, (self.features,))

  def offset_and_mask(self, x):
    """mmcv: o1, o2, m = chunk(conv_offset(x), 3); offset = cat(o1, o2); mask = sigmoid(m)."""
    out = self.conv_offset(x)
    n = 2 * self.deform_groups * self.kernel_size ** 2
    return out[..., :n], jax.nn.sigmoid(out[..., n:])

  def __call__(self, x):
    """This layer alone (what `ModulatedDeformConv2dPack` computes)."""
    return grouped_deform_conv((self,), (x,), dtype=self.dtype)[0]


def grouped_deform_conv(layers: Sequence[DeformConvWeights], inputs: Sequence[jax.Array],
                        dtype=None):
  """``[layer(x) for layer, x in zip(layers, inputs)]`` in one `deform_conv2d` call.

  Every input is (B, H, W, layer.in_features) with the same (B, H, W); all layers share the
  kernel size and deform_groups. Returns the list of (B, H, W, layer.features) outputs.
  """
  if len(layers) != len(inputs) or not layers:
    raise ValueError(f'grouped_deform_conv: {len(layers)} layers for {len(inputs)} inputs')
  k, dg = layers[0].kernel_size, layers[0].deform_groups
  cin, cout = layers[0].in_features, layers[0].features
  for layer, x in zip(layers, inputs):
    if (layer.kernel_size, layer.deform_groups, layer.in_features, layer.features) != (
        k, dg, cin, cout) or x.shape[:3] != inputs[0].shape[:3] or x.shape[-1] != cin:
      raise ValueError('grouped_deform_conv: layers must agree in kernel size, deform groups '
                       'and channels, inputs in shape')
  offsets, masks = zip(*(layer.offset_and_mask(x) for layer, x in zip(layers, inputs)))
  cat = lambda arrays: arrays[0] if len(arrays) == 1 else jnp.concatenate(arrays, axis=-1)
  x, offset, mask = cat(inputs), cat(offsets), cat(masks)
  kernel = cat([layer.kernel for layer in layers])
  if dtype is not None:
    x, offset, mask, kernel = (a.astype(dtype) for a in (x, offset, mask, kernel))
  y = deform_conv2d(x, offset, mask, kernel, padding=k // 2, deform_groups=dg * len(layers),
                    groups=len(layers))
  outs = []
  for g, layer in enumerate(layers):
    out = y[..., g * cout:(g + 1) * cout]
    outs.append(out + layer.bias.astype(out.dtype) if layer.use_bias else out)
  return outs
