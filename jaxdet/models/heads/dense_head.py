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
import math
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdet.models.heads.head import image_valid
from jaxdet.models.layers.conv import Conv
from jaxdet.priors import valid_flags

_normal_init = nn.initializers.normal(stddev=0.01)

# mmdetection's names of `DenseHead`'s towers and scales (bbox_head.*, as its ATSSHead, RetinaHead
# and FCOSHead name them); each head file adds its output convs.
DENSE_HEAD_TORCH_NAMES = (
    (r'(cls|reg)_convs\.(\d+)\.conv', r'\1_convs_\2'),
    (r'(cls|reg)_convs\.(\d+)\.gn', r'\1_gns_\2'),
    (r'scales\.(\d+)', r'scales_\1'),
)


def assigned_gt_boxes(gt_boxes, gt_index, fallback):
  """(B, A, 4) the gt box assigned to each prior: `gt_boxes (B, G, 4)` rows picked by
  `gt_index (B, A)`; where `gt_index < 0` the prior's own `fallback (A, 4)` box, a finite
  stand-in so that losses masked to the positives stay finite (and so do their gradients)."""
  rows = jnp.take_along_axis(gt_boxes, jnp.maximum(gt_index, 0)[..., None], axis=1)
  return jnp.where((gt_index >= 0)[..., None], rows, fallback[None])


class AnchorTargets(NamedTuple):
  """What the anchor-based heads' losses (ATSS, RetinaNet, SSD) share, for a batch of B images.

  assign: the assigner's result, each field (B, A) (gt_index, labels, max_overlap).
  pos: (B, A) bool positives; num_pos_per_image: (B,) int32.
  cls_weights: (B, A) float32, 1 except for ignored anchors (gt_index -2: invalid anchors, those
    of images with image_valid False, and the assigner's ignores) -- mmdetection drops those.
  avg_factor: float32, the device's sum over its real images of max(num_pos, 1) (mmdetection's
    PseudoSampler normaliser, not reduced across devices).
  """
  assign: NamedTuple
  pos: jax.Array
  num_pos_per_image: jax.Array
  cls_weights: jax.Array
  avg_factor: jax.Array


def anchor_targets(assign_one, featmap_sizes, batch, *, strides, num_base_priors=1):
  """Assigns every image of `batch` (vmapped) and derives the shared loss quantities.

  Args:
    assign_one: `assign_one(gt_boxes (G, 4), gt_labels (G,), gt_mask (G,), valid (A,))` -> an
      assignment with per-anchor `gt_index`, `labels`, `max_overlap` (one image).
    featmap_sizes: static ((h, w), ...) per level; strides: per level.
    batch: gt_boxes (B, G, 4), gt_labels (B, G), gt_mask (B, G), pad_shape (B, 2), and
      image_valid (B,) (optional: all True).
    num_base_priors: anchors per location (RetinaNet 9).
  Valid anchors are those inside each image's padded shape (mmdetection's valid flags); an image
  with image_valid False has none and no gt, so it adds nothing to any loss or normaliser.
  """
  real = image_valid(batch)
  valid = valid_flags(featmap_sizes, batch['pad_shape'], strides=tuple(strides),
                      num_base_priors=num_base_priors) & real[:, None]
  gt_mask = batch['gt_mask'] & real[:, None]
  assign = jax.vmap(assign_one)(batch['gt_boxes'], batch['gt_labels'], gt_mask, valid)
  pos = assign.gt_index >= 0
  num_pos_per_image = pos.sum(axis=1)
  avg_factor = jnp.where(real, jnp.maximum(num_pos_per_image, 1), 0).sum().astype(jnp.float32)
  return AnchorTargets(assign=assign, pos=pos, num_pos_per_image=num_pos_per_image,
                       cls_weights=(assign.gt_index != -2).astype(jnp.float32),
                       avg_factor=avg_factor)


class Scale(nn.Module):
  """A learnable scalar multiplier, initialised to `init` (mmcv's `Scale`)."""
  init: float = 1.0

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.initializers.constant(self.init), ())
    return x * scale.astype(x.dtype)


def _conv3x3(features, name, use_bias=True, bias_init=nn.initializers.zeros, dtype=None):
  return Conv(features, (3, 3), padding=((1, 1), (1, 1)), use_bias=use_bias, name=name,
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

  def __call__(self, feats, img_shape=None, input_shape=None, train: bool = False):
    del img_shape, input_shape, train  # the same computation for training and testing
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
