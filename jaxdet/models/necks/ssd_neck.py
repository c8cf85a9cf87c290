"""SSD's extra layers (Liu et al. 2016): mmdetection 3.3's `SSDNeck`, NHWC.

Input: the backbone's maps (conv4_3, fc7). Output: those two -- conv4_3 through `L2Norm` (each
position's channel vector scaled to unit L2 norm, times a learnt per-channel weight initialised
to `l2_norm_scale`, eps 1e-10 added to the norm) -- then one map per extra level, each a 1x1 conv
to half its width + ReLU and a kxk conv (stride / padding per level) + ReLU on the previous map.

  SSD300: out_channels (512, 1024, 512, 256, 256, 256), level_strides (2, 2, 1, 1),
          level_paddings (1, 1, 0, 0), last kernel 3: maps 38, 19, 10, 5, 3, 1 -> 2,460,032 params.
  SSD512: out_channels (512, 1024, 512, 256, 256, 256, 256), strides (2, 2, 2, 2, 1),
          paddings (1, 1, 1, 1, 1), last kernel 4: maps 64, 32, 16, 8, 4, 2, 1 -> 3,017,472.

Names follow mmdetection (`l2_norm` with leaf `scale` for its `weight`, `extra_layers_{i}_0`
/ `extra_layers_{i}_1` for `extra_layers.i.0.conv` / `extra_layers.i.1.conv`); `TORCH_NAMES` maps
them. Initialisation: xavier-uniform weights, zero biases (mmdetection's `init_cfg`).
`norm='bn'` is mmdetection's `norm_cfg=dict(type='BN')`: each extra conv loses its bias and gets a
BatchNorm (`extra_layers.i.j.bn`, scale 1, bias 0) before its ReLU (the smoke's from-scratch run).
"""
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxdet.models.layers.conv import Conv
from jaxdet.models.registry import NECKS, Part

TORCH_NAMES = (
    (r'l2_norm', r'l2_norm'),
    (r'extra_layers\.(\d+)\.([01])\.conv', r'extra_layers_\1_\2'),
    (r'extra_layers\.(\d+)\.([01])\.bn', r'extra_layers_\1_\2_bn'),
)

_xavier = nn.initializers.xavier_uniform()


class L2Norm(nn.Module):
  """x * weight / (||x||_2 over channels + eps), computed in float32, returned in x's dtype."""
  scale: float = 20.
  eps: float = 1e-10

  @nn.compact
  def __call__(self, x):
    weight = self.param('scale', nn.initializers.constant(self.scale), (x.shape[-1],))
    xf = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True)) + self.eps
    return (weight.astype(jnp.float32) * xf / norm).astype(x.dtype)


class SSDNeck(nn.Module):
  """`feats` (conv4_3, fc7) -> tuple of `len(out_channels)` maps (see the module docstring)."""
  in_channels: Sequence[int] = (512, 1024)
  out_channels: Sequence[int] = (512, 1024, 512, 256, 256, 256)
  level_strides: Sequence[int] = (2, 2, 1, 1)
  level_paddings: Sequence[int] = (1, 1, 0, 0)
  l2_norm_scale: float = 20.
  last_kernel_size: int = 3
  norm: str = ''           # '' or 'bn' (mmdetection's norm_cfg=dict(type='BN'))
  norm_eval: bool = False  # norm 'bn': normalise with the stored statistics even in training
  dtype: jnp.dtype = None

  @nn.compact
  def __call__(self, feats, train: bool = False, **unused):
    in_ch, out_ch = tuple(self.in_channels), tuple(self.out_channels)
    num_extra = len(out_ch) - len(in_ch)
    if (num_extra < 1 or len(self.level_strides) != num_extra
        or len(self.level_paddings) != num_extra or out_ch[:len(in_ch)] != in_ch):
      raise ValueError(
          f'model.neck: out_channels {out_ch} must start with in_channels {in_ch} and add one '
          f'level per level_strides {tuple(self.level_strides)} / level_paddings '
          f'{tuple(self.level_paddings)}')
    if len(feats) != len(in_ch) or any(f.shape[-1] != c for f, c in zip(feats, in_ch)):
      raise ValueError(f'model.neck.in_channels={in_ch} but the backbone gives '
                       f'{tuple(f.shape[-1] for f in feats)}')
    if self.norm not in ('', 'bn'):
      raise ValueError(f"model.neck.norm={self.norm!r} must be '' or 'bn'")
    with_bn = self.norm == 'bn'

    def conv_act(x, width, kernel, stride, pad, name):
      x = Conv(width, (kernel, kernel), strides=(stride, stride),
               padding=((pad, pad), (pad, pad)), use_bias=not with_bn, kernel_init=_xavier,
               name=name, dtype=self.dtype)(x)
      if with_bn:
        x = nn.BatchNorm(use_running_average=self.norm_eval or not train, momentum=0.9,
                         epsilon=1e-5, name=f'{name}_bn', dtype=self.dtype)(x)
      return nn.relu(x)

    outs = list(feats)
    if self.l2_norm_scale:
      outs[0] = L2Norm(self.l2_norm_scale, name='l2_norm')(outs[0])
    x = outs[-1]
    for i, (width, stride, pad) in enumerate(zip(out_ch[len(in_ch):], self.level_strides,
                                                 self.level_paddings)):
      kernel = self.last_kernel_size if i == num_extra - 1 else 3
      x = conv_act(x, width // 2, 1, 1, 0, f'extra_layers_{i}_0')
      if min(x.shape[1:3]) + 2 * pad < kernel:
        raise ValueError(f'model.neck: extra level {i} gets a {x.shape[1]}x{x.shape[2]} map, '
                         f'too small for a {kernel}x{kernel} conv with padding {pad}; use '
                         'fewer levels or a larger input')
      x = conv_act(x, width, kernel, stride, pad, f'extra_layers_{i}_1')
      outs.append(x)
    return tuple(outs)


def from_config(cfg, dtype=None):
  """The SSDNeck of `config.model.neck` (type 'ssd_neck')."""
  return SSDNeck(in_channels=tuple(cfg.in_channels), out_channels=tuple(cfg.out_channels),
                 level_strides=tuple(cfg.level_strides),
                 level_paddings=tuple(cfg.level_paddings),
                 l2_norm_scale=cfg.get('l2_norm_scale', 20.),
                 last_kernel_size=cfg.get('last_kernel_size', 3), norm=cfg.get('norm', ''),
                 norm_eval=cfg.get('norm_eval', False), dtype=dtype)


NECKS.register('ssd_neck', Part(build=from_config, torch_names=TORCH_NAMES))
