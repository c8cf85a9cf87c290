"""The dense head shared by the one-stage detectors (RetinaNet, ATSS, FCOS), NHWC.

One module, shared over pyramid levels: a classification tower and a regression tower of
`num_convs` 3x3 convs (optionally GroupNorm), then 3x3 output convs for class logits, box regression
and (optionally) centerness, and a learnable scalar `Scale` per level on the regression output.
Initialisation as mmdetection: conv weights N(0, 0.01), biases 0, class bias -log((1-p)/p), p=0.01.

Returns raw outputs; what they mean (deltas, log-distances, ...) is the detector's business:
  cls:        tuple over levels of (B, H_l, W_l, num_anchors * num_classes) logits
  reg:        tuple over levels of (B, H_l, W_l, num_anchors * 4), already multiplied by the scale
  centerness: tuple over levels of (B, H_l, W_l, num_anchors) logits, or None
"""
import dataclasses
import math
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

_normal_init = nn.initializers.normal(stddev=0.01)


@dataclasses.dataclass(frozen=True)
class DenseDetectorHead:
  """What a one-stage detector adds to backbone + neck: three functions of `config.model.head`.

  module(head_cfg, num_classes, dtype) -> a Flax module (usually a configured `DenseHead`);
  loss(outputs, batch, head_cfg, *, axis_name=None) -> dict of scalars (`loss_*` are summed);
  predict(outputs, batch, head_cfg, test_cfg) -> `Predictions` with a leading batch axis.
  Each head file defines one as `HEAD`; `jaxdet.models.detectors` registers them by name.
  """
  module: Callable
  loss: Callable
  predict: Callable


def assigned_gt_boxes(gt_boxes, gt_index, fallback):
  """(B, A, 4) the gt box assigned to each prior: `gt_boxes (B, G, 4)` rows picked by
  `gt_index (B, A)`; where `gt_index < 0` the prior's own `fallback (A, 4)` box, a finite
  stand-in so that losses masked to the positives stay finite (and so do their gradients)."""
  rows = jnp.take_along_axis(gt_boxes, jnp.maximum(gt_index, 0)[..., None], axis=1)
  return jnp.where((gt_index >= 0)[..., None], rows, fallback[None])


def mean_over_devices(x, axis_name):
  """mmdetection's `reduce_mean`: the mean of `x` over the device axis (identity for None)."""
  return jax.lax.pmean(x, axis_name) if axis_name is not None else x


class Scale(nn.Module):
  """A learnable scalar multiplier, initialised to `init` (mmcv's `Scale`)."""
  init: float = 1.0

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.initializers.constant(self.init), ())
    return x * scale.astype(x.dtype)


def _conv3x3(features, name, use_bias=True, bias_init=nn.initializers.zeros, dtype=None):
  return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), use_bias=use_bias, name=name,
                 kernel_init=_normal_init, bias_init=bias_init, dtype=dtype)


class DenseHead(nn.Module):
  """Stacked-conv dense head. Input: tuple of pyramid maps (B, H_l, W_l, in_channels)."""
  num_classes: int
  num_anchors: int = 1
  num_levels: int = 5
  feat_channels: int = 256
  num_convs: int = 4
  norm: Optional[str] = 'gn'  # 'gn' (GroupNorm 32) or None
  gn_groups: int = 32
  use_scale: bool = True
  centerness: Optional[str] = 'reg'  # centerness branch off the 'reg' or 'cls' tower, or None
  prior_prob: float = 0.01
  dtype: jnp.dtype = None

  def setup(self):
    if self.norm not in ('gn', None):
      raise ValueError(f"DenseHead norm={self.norm!r} must be 'gn' or None")
    if self.centerness not in ('reg', 'cls', None):
      raise ValueError(f"DenseHead centerness={self.centerness!r} must be 'reg', 'cls' or None")
    with_norm = self.norm == 'gn'

    def tower(prefix):
      layers = []
      for i in range(self.num_convs):
        layers.append(_conv3x3(self.feat_channels, f'{prefix}_convs_{i}', use_bias=not with_norm,
                               dtype=self.dtype))
        layers.append(nn.GroupNorm(self.gn_groups, epsilon=1e-5, name=f'{prefix}_gns_{i}',
                                   dtype=self.dtype) if with_norm else None)
      return layers

    self.cls_tower = tower('cls')
    self.reg_tower = tower('reg')
    bias_cls = -math.log((1 - self.prior_prob) / self.prior_prob)
    self.conv_cls = _conv3x3(self.num_anchors * self.num_classes, 'conv_cls',
                             bias_init=nn.initializers.constant(bias_cls), dtype=self.dtype)
    self.conv_reg = _conv3x3(self.num_anchors * 4, 'conv_reg', dtype=self.dtype)
    if self.centerness:
      self.conv_centerness = _conv3x3(self.num_anchors, 'conv_centerness', dtype=self.dtype)
    if self.use_scale:
      self.scales = [Scale(name=f'scales_{i}') for i in range(self.num_levels)]

  @staticmethod
  def _run_tower(layers, x):
    for i in range(0, len(layers), 2):
      x = layers[i](x)
      if layers[i + 1] is not None:
        x = layers[i + 1](x)
      x = nn.relu(x)
    return x

  def __call__(self, feats):
    if len(feats) != self.num_levels:
      raise ValueError(f'DenseHead got {len(feats)} levels, configured for {self.num_levels}')
    cls_out, reg_out, ctr_out = [], [], []
    for level, x in enumerate(feats):
      cls_feat = self._run_tower(self.cls_tower, x)
      reg_feat = self._run_tower(self.reg_tower, x)
      cls_out.append(self.conv_cls(cls_feat))
      reg = self.conv_reg(reg_feat)
      reg_out.append(self.scales[level](reg) if self.use_scale else reg)
      if self.centerness:
        ctr_out.append(self.conv_centerness(reg_feat if self.centerness == 'reg' else cls_feat))
    return tuple(cls_out), tuple(reg_out), (tuple(ctr_out) if self.centerness else None)
