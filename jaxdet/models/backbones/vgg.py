"""SSD's VGG backbone (Simonyan & Zisserman 2015; Liu et al. 2016): mmdetection 3.3's `SSDVGG`, NHWC.

mmcv's `VGG(depth, with_last_pool=False, ceil_mode=True)` -- 3x3 convs (pad 1) + ReLU, a 2x2
stride-2 max pool after every stage except the last, pools rounding up (`ceil_mode`, so 75 -> 38
at input 300) -- followed by SSD's additions: a 3x3 stride-1 pad-1 max pool ("pool5"), conv6
(3x3, dilation 6, pad 6, 1024 channels) + ReLU and conv7 (1x1, 1024) + ReLU (the fc6 / fc7 of
VGG turned into convolutions). Outputs: conv4_3 after its ReLU (stride 8) and fc7 (stride 16).

`SSDVGG(depth=16)` has exactly mmdetection's parameters: 20,483,904.

Layers are named as mmcv's `features` Sequential: `features_0` (conv1_1), `features_2`, ...,
`features_31` (conv6), `features_33` (conv7) for VGG16; with `with_bn` every conv is followed
by a BatchNorm and the indices shift as mmcv's do (conv, bn, relu). So the PyTorch name table is
one rule, `features.N -> features_N` (`TORCH_NAMES`).

Knobs for small runs: `depth` 11 / 13 / 16 / 19 and `with_bn` (as mmcv's VGG; here `with_bn`
also puts a BatchNorm after conv6 and conv7, which mmdetection's SSDVGG appends plain -- no SSD
config of mmdetection sets it), and `base_width` (64 in VGG; every width scales with it: stage
widths base * (1, 2, 4, 8, 8), conv6 / conv7 base * 16).
Initialisation (mmdetection's without pretrained weights): Kaiming normal, fan_out, ReLU gain,
biases 0; BN scale 1, bias 0.
"""
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxdet.models.layers.conv import Conv
from jaxdet.models.registry import BACKBONES, Part
from jaxdet.ops.pooling import max_pool2d

ARCH_SETTINGS = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3),
                 19: (2, 2, 4, 4, 4)}

# mmdetection / mmcv `backbone.features.N.*` -> `backbone/features_N/*` (relative to the part).
TORCH_NAMES = ((r'features\.(\d+)', r'features_\1'),)

_kaiming = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _max_pool_ceil(x, window, stride):
  """torch `MaxPool2d(window, stride, ceil_mode=True)` without padding: the last window may
  run past the bottom / right border (filled with -inf, so it never wins)."""
  def extra(size):
    out = -(-(size - window) // stride) + 1
    if (out - 1) * stride >= size:  # torch: the last window must start inside the input
      out -= 1
    return (out - 1) * stride + window - size
  h, w = x.shape[1:3]
  x = jnp.pad(x, ((0, 0), (0, extra(h)), (0, extra(w)), (0, 0)), constant_values=-jnp.inf)
  return max_pool2d(x, (window, window), (stride, stride), (0, 0))


class SSDVGG(nn.Module):
  """Input `x: (B, H, W, 3)` normalised image; returns `(conv4_3, fc7)`: (B, ceil(H/8),
  ceil(W/8), 8 base) after ReLU and (B, ceil(H/16), ceil(W/16), 16 base)."""
  depth: int = 16
  base_width: int = 64
  with_bn: bool = False
  norm_eval: bool = False   # with_bn: normalise with the stored statistics even in training
  dtype: jnp.dtype = None

  @nn.compact
  def __call__(self, x, train: bool = False, **unused):
    if self.depth not in ARCH_SETTINGS:
      raise ValueError(f'model.backbone.depth={self.depth} must be one of {sorted(ARCH_SETTINGS)}')
    if self.base_width < 1:
      raise ValueError(f'model.backbone.base_width={self.base_width} must be >= 1')
    index = 0

    def conv_relu(x, features, kernel=3, padding=1, dilation=1, bn=False):
      nonlocal index
      x = Conv(features, (kernel, kernel), padding=((padding, padding), (padding, padding)),
               kernel_dilation=(dilation, dilation), kernel_init=_kaiming,
               name=f'features_{index}', dtype=self.dtype)(x)
      index += 1
      if bn:
        x = nn.BatchNorm(use_running_average=self.norm_eval or not train, momentum=0.9,
                         epsilon=1e-5, name=f'features_{index}', dtype=self.dtype)(x)
        index += 1
      index += 1  # the ReLU
      return nn.relu(x)

    outs = []
    stages = ARCH_SETTINGS[self.depth]
    for i, num_convs in enumerate(stages):
      width = self.base_width * 2 ** min(i, 3)
      for _ in range(num_convs):
        x = conv_relu(x, width, bn=self.with_bn)
      if i == 3:
        outs.append(x)                      # conv4_3 (the last conv of stage 4), after ReLU
      if i < len(stages) - 1:
        x = _max_pool_ceil(x, 2, 2)
        index += 1
    x = max_pool2d(x, (3, 3), (1, 1), (1, 1))  # pool5
    index += 1
    x = conv_relu(x, self.base_width * 16, 3, padding=6, dilation=6, bn=self.with_bn)  # conv6
    x = conv_relu(x, self.base_width * 16, 1, padding=0, bn=self.with_bn)              # conv7
    outs.append(x)
    return tuple(outs)


def vgg_out_channels(base_width=64) -> Sequence[int]:
  """Channels of `SSDVGG`'s two outputs: (8 base, 16 base) = (512, 1024) for VGG."""
  return (8 * base_width, 16 * base_width)


def from_config(cfg, dtype=None):
  """The SSDVGG of `config.model.backbone` (type 'vgg')."""
  return SSDVGG(depth=cfg.get('depth', 16), base_width=cfg.get('base_width', 64),
                with_bn=cfg.get('with_bn', False), norm_eval=cfg.get('norm_eval', False),
                dtype=dtype)


# An ImageNet VGG file may hold the classifier (`classifier.*`), which SSD does not use.
TORCH_SKIP = (r'classifier\.\d+\.(weight|bias)',)

BACKBONES.register('vgg', Part(build=from_config, torch_names=TORCH_NAMES, torch_skip=TORCH_SKIP))
