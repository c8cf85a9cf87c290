"""Feature Pyramid Network (Lin et al. 2017) as mmdetection's `FPN`, NHWC.

With in_channels (256, 512, 1024, 2048), out 256, start_level 1 and 5 outputs it has exactly
mmdetection's parameters: 3,868,672 with extra convs 'on_output' (ATSS, FCOS), 7,997,440 with
'on_input' (RetinaNet).
"""
from typing import Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdet.models.layers.conv import Conv
from jaxdet.models.registry import NECKS, Part


def _conv(features, kernel, stride=1, name=None, dtype=None):
  pad = kernel // 2
  return Conv(features, (kernel, kernel), strides=(stride, stride),
              padding=((pad, pad), (pad, pad)), name=name, dtype=dtype,
              kernel_init=nn.initializers.xavier_uniform())


def _upsample_nearest(x, shape_hw):
  """Nearest upsampling to `shape_hw` as torch's F.interpolate(mode='nearest', size=...)."""
  b, h, w, c = x.shape
  ys = (jnp.arange(shape_hw[0]) * h // shape_hw[0])
  xs = (jnp.arange(shape_hw[1]) * w // shape_hw[1])
  return x[:, ys][:, :, xs]


class FPN(nn.Module):
  """Input: the backbone's tuple of feature maps (B, Hi, Wi, Ci); output: `num_outs` maps of
  `out_channels`, finest first (P3..P7 for start_level 1 on a C2..C5 backbone).

  add_extra_convs: False (extra levels by stride-2 max pooling of the last output), 'on_input'
  (first extra conv on the last backbone map), 'on_lateral' (on the last lateral), 'on_output' (on
  the last FPN output). relu_before_extra_convs applies ReLU before every extra conv except the
  first, whose input is taken raw, exactly as mmdetection does.
  """
  out_channels: int = 256
  num_outs: int = 5
  start_level: int = 1
  end_level: int = -1
  add_extra_convs: Union[bool, str] = 'on_output'
  relu_before_extra_convs: bool = False
  dtype: jnp.dtype = None

  @nn.compact
  def __call__(self, feats: Sequence[jax.Array], train: bool = False):
    del train  # no BN / dropout
    extra_mode = self.add_extra_convs
    if extra_mode is True:
      extra_mode = 'on_input'
    if extra_mode not in (False, 'on_input', 'on_lateral', 'on_output'):
      raise ValueError(f'FPN add_extra_convs={self.add_extra_convs!r} must be False, '
                       "'on_input', 'on_lateral' or 'on_output'")
    end = len(feats) if self.end_level == -1 else self.end_level + 1
    inputs = feats[self.start_level:end]
    laterals = [_conv(self.out_channels, 1, name=f'lateral_convs_{i}', dtype=self.dtype)(x)
                for i, x in enumerate(inputs)]
    for i in range(len(laterals) - 1, 0, -1):  # top-down pathway
      laterals[i - 1] = laterals[i - 1] + _upsample_nearest(laterals[i], laterals[i - 1].shape[1:3])
    outs = [_conv(self.out_channels, 3, name=f'fpn_convs_{i}', dtype=self.dtype)(x)
            for i, x in enumerate(laterals)]
    num_extra = self.num_outs - len(outs)
    if num_extra > 0 and not extra_mode:
      for _ in range(num_extra):  # mmdetection: F.max_pool2d(out, 1, stride=2)
        outs.append(outs[-1][:, ::2, ::2])
    elif num_extra > 0:
      source = {'on_input': feats[end - 1], 'on_lateral': laterals[-1],
                'on_output': outs[-1]}[extra_mode]
      for k in range(num_extra):
        i = len(laterals) + k
        x = source if k == 0 else outs[-1]
        if self.relu_before_extra_convs and k > 0:
          x = nn.relu(x)
        outs.append(_conv(self.out_channels, 3, 2, name=f'fpn_convs_{i}', dtype=self.dtype)(x))
    return tuple(outs)


def from_config(cfg, dtype=None):
  """The FPN of `config.model.neck` (type 'fpn')."""
  return FPN(out_channels=cfg.out_channels, num_outs=cfg.num_outs, start_level=cfg.start_level,
             add_extra_convs=cfg.add_extra_convs,
             relu_before_extra_convs=cfg.relu_before_extra_convs, dtype=dtype)


# mmdetection's FPN names: mmcv ConvModule's `.conv` inside lateral_convs / fpn_convs.
TORCH_NAMES = ((r'(lateral_convs|fpn_convs)\.(\d+)\.conv', r'\1_\2'),)

NECKS.register('fpn', Part(build=from_config, torch_names=TORCH_NAMES))
