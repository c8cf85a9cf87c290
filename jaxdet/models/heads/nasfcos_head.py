"""NAS-FCOS's searched head as mmdetection 3.3's `NASFCOSHead` (an `FCOSHead`), NHWC.

Registered as `config.model.type = 'nas_fcos'`: this module with FCOS's loss and prediction
(`fcos_head.fcos_loss` / `fcos_predict`: assignment by regress ranges, focal + IoU + centerness
BCE, NMS), as mmdetection's `NASFCOSHead` inherits them from `FCOSHead`.

Each branch (classification, regression) is the searched tower, every op an mmcv `ConvModule`
(conv -> GroupNorm -> ReLU), 256 channels:

  0: dconv3x3  DCNv2 3x3 (deform_groups 2, bias, its own zero-initialised offset conv)
  1: conv3x3   plain 3x3, no bias
  2: dconv3x3  as 0
  3: conv1x1   plain 1x1, no bias

(at each level the two branches' DCNs of one op run as one grouped call,
`jaxdet.models.layers.deform_conv_group`: the same sums, half the compiled DCNs), then, as
`FCOSHead`, 3x3 output convs `conv_cls` (classes), `conv_reg` (4, times the level's
learnable `Scale`) and `conv_centerness` (1, off the classification tower; `centerness_on_reg`
puts it on the regression tower), shared over levels.

Initialisation as mmdetection's (`NASFCOSHead` init_cfg): the plain tower convs caffe2-xavier
(uniform, bound sqrt(3 / fan_in)); the DCNs mmcv's (uniform 1 / sqrt(fan_in), bias 0, offsets
0); output convs N(0, 0.01), biases 0 except conv_cls's -log((1 - p) / p), p = 0.01; GN 1 / 0;
scales 1.

Outputs, as `DenseHead`'s and what `fcos_head.fcos_loss` / `fcos_predict` consume:
  cls:        tuple over levels of (B, H_l, W_l, num_classes) logits
  reg:        tuple over levels of (B, H_l, W_l, 4), raw, already multiplied by the scale
              (log-distances: `fcos_head.reg_to_distances` takes exp)
  centerness: tuple over levels of (B, H_l, W_l, 1) logits
With 80 classes, 5 levels and 256 channels: 4,368,946 parameters, as mmdetection's.
"""
import math
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from jaxdet.models.heads.dense_head import Scale
from jaxdet.models.heads.fcos_head import fcos_loss, fcos_predict
from jaxdet.models.heads.head import Head
from jaxdet.models.layers.conv import Conv
from jaxdet.models.layers.deform_conv_group import DeformConvWeights, grouped_deform_conv
from jaxdet.models.registry import HEADS

caffe2_xavier = nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform')
_normal_init = nn.initializers.normal(stddev=0.01)

# The searched tower: (deformable, kernel size) per op, mmdetection's `arch_config`.
ARCH = ((True, 3), (False, 3), (True, 3), (False, 1))


class NASFCOSHead(nn.Module):
  """Input: the neck's tuple of (B, H_l, W_l, C) maps; output (cls, reg, centerness)."""
  num_classes: int
  num_levels: int = 5
  feat_channels: int = 256
  in_channels: Optional[int] = None  # the neck's channels (None: feat_channels)
  gn_groups: int = 32
  deform_groups: int = 2
  centerness_on_reg: bool = False
  prior_prob: float = 0.01
  dtype: Optional[Any] = None

  def setup(self):
    def tower(prefix):
      convs, gns = [], []
      for i, (deformable, k) in enumerate(ARCH):
        if deformable:
          chn = (self.in_channels or self.feat_channels) if i == 0 else self.feat_channels
          conv = DeformConvWeights(self.feat_channels, chn, k, self.deform_groups,
                                   use_bias=True, dtype=self.dtype, name=f'{prefix}_convs_{i}')
        else:
          conv = Conv(self.feat_channels, (k, k), padding=((k // 2,) * 2,) * 2,
                      use_bias=False, kernel_init=caffe2_xavier, dtype=self.dtype,
                      name=f'{prefix}_convs_{i}')
        convs.append(conv)
        gns.append(nn.GroupNorm(self.gn_groups, epsilon=1e-5, dtype=self.dtype,
                                name=f'{prefix}_gns_{i}'))
      return convs, gns

    self.cls_tower = tower('cls')
    self.reg_tower = tower('reg')
    out_conv = lambda n, name, bias_init=nn.initializers.zeros: Conv(
        n, (3, 3), padding=((1, 1), (1, 1)), kernel_init=_normal_init, bias_init=bias_init,
        dtype=self.dtype, name=name)
    bias_cls = -math.log((1 - self.prior_prob) / self.prior_prob)
    self.conv_cls = out_conv(self.num_classes, 'conv_cls', nn.initializers.constant(bias_cls))
    self.conv_reg = out_conv(4, 'conv_reg')
    self.conv_centerness = out_conv(1, 'conv_centerness')
    self.scales = [Scale(name=f'scales_{i}') for i in range(self.num_levels)]

  def _run_towers(self, x):
    """Both towers on one level; each pair of DCNs (cls, reg) is one grouped call."""
    cls_feat = reg_feat = x
    for i, (deformable, _) in enumerate(ARCH):
      cls_conv, reg_conv = self.cls_tower[0][i], self.reg_tower[0][i]
      if deformable:
        cls_feat, reg_feat = grouped_deform_conv([cls_conv, reg_conv], [cls_feat, reg_feat],
                                                 dtype=self.dtype)
      else:
        cls_feat, reg_feat = cls_conv(cls_feat), reg_conv(reg_feat)
      cls_feat = nn.relu(self.cls_tower[1][i](cls_feat))
      reg_feat = nn.relu(self.reg_tower[1][i](reg_feat))
    return cls_feat, reg_feat

  def __call__(self, feats, img_shape=None, input_shape=None, train: bool = False):
    del img_shape, input_shape, train  # a dense head: no padding mask, no BN, no dropout
    if len(feats) != self.num_levels:
      raise ValueError(f'NASFCOSHead got {len(feats)} levels, configured for {self.num_levels}')
    cls_out, reg_out, ctr_out = [], [], []
    for level, x in enumerate(feats):
      if x.shape[-1] != (self.in_channels or self.feat_channels):
        raise ValueError(f'NASFCOSHead: level {level} has {x.shape[-1]} channels, expected '
                         f'{self.in_channels or self.feat_channels} (in_channels)')
      cls_feat, reg_feat = self._run_towers(x)
      cls_out.append(self.conv_cls(cls_feat))
      reg_out.append(self.scales[level](self.conv_reg(reg_feat)))
      ctr_out.append(self.conv_centerness(reg_feat if self.centerness_on_reg else cls_feat))
    return tuple(cls_out), tuple(reg_out), tuple(ctr_out)


def nasfcos_head_module(head_cfg, num_classes, dtype=None):
  """The NAS-FCOS head of `config.model.head`."""
  return NASFCOSHead(num_classes=num_classes, num_levels=len(head_cfg.strides),
                     feat_channels=head_cfg.feat_channels,
                     in_channels=head_cfg.get('in_channels', None), gn_groups=head_cfg.get('gn_groups', 32),
                     deform_groups=head_cfg.get('deform_groups', 2),
                     centerness_on_reg=head_cfg.get('centerness_on_reg', False), dtype=dtype)


# mmdetection's NASFCOSHead tensor names (relative to 'bbox_head.') -> jaxdet module paths.
TORCH_NAMES = (
    (r'(cls|reg)_convs\.(\d+)\.conv', r'\1_convs_\2'),
    (r'(cls|reg)_convs\.(\d+)\.conv\.conv_offset', r'\1_convs_\2/conv_offset'),
    (r'(cls|reg)_convs\.(\d+)\.gn', r'\1_gns_\2'),
    (r'scales\.(\d+)', r'scales_\1'),
    (r'conv_(cls|reg|centerness)', r'conv_\1'),
)

HEAD = HEADS.register('nas_fcos', Head(module=nasfcos_head_module, loss=fcos_loss,
                                       predict=fcos_predict, torch_names=TORCH_NAMES))
