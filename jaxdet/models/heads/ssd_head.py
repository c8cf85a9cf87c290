"""SSD head (Liu et al. 2016): mmdetection 3.3's `SSDHead` -- network, loss and prediction.

Network (`SSDHeadModule`): per level one 3x3 conv (pad 1) to `P_l * (C + 1)` class logits
(softmax over C classes + background, background LAST) and one to `P_l * 4` DeltaXYWH deltas,
`P_l = 2 + 2 len(ratios[l])` priors per location (4 or 6); xavier-uniform weights, zero biases.
Outputs: `(cls, reg)`, tuples over levels of (B, H_l, W_l, P_l (C + 1)) and (B, H_l, W_l, P_l 4),
channel `p * (C + 1) + c` for prior p, as mmdetection's permute + reshape.

Priors: `jaxdet.priors.ssd_anchor_grid` (mmdetection's `SSDAnchorGenerator(scale_major=False)`):
sizes from `input_size` + `basesize_ratio_range`, or explicit `min_sizes` / `max_sizes`.

Loss (`ssd_loss`), per device, as `SSDHead.loss_by_feat`:
  - each image's valid priors (inside its padded shape; `allowed_border=-1`) assigned by
    `max_iou_assign(pos 0.5, neg 0.5, min_pos_iou 0, gt_max_assign_all=False)`: every gt also
    takes its single best prior (even at IoU 0), a later gt winning a shared best prior;
  - classification: softmax CE of every positive (its class) plus, per image, the CE of the
    top `min(neg_pos_ratio * num_pos, num_neg)` negatives (background) by CE
    (`jaxdet.losses.ssd_hard_negative_ce`; invalid priors count as negatives with CE 0, as
    mmdetection's zero label weight gives);
  - smooth L1 (beta `smoothl1_beta`) between the positives' deltas and their gts' encodings
    (means 0, stds (0.1, 0.1, 0.2, 0.2)), summed over the 4 coordinates;
  - both divided by `avg_factor`: 'device' (mmdetection's) = the sum over this device's real
    images of max(num_pos, 1), not reduced across devices; 'global' = its mean over devices.
  Images with image_valid False add nothing (no gts, no valid prior, no normaliser share).
Predict (`ssd_predict`): softmax scores with the background column dropped, per level the top
`nms_pre` (prior, class) pairs above `score_thr`, decoded (clipped to the image), mapped to
original pixels, zero-width / zero-height boxes dropped, class-aware NMS, `max_per_img`.
"""
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdet import losses
from jaxdet.assigners.max_iou import max_iou_assign
from jaxdet.models.heads.dense_head import anchor_targets, assigned_gt_boxes
from jaxdet.models.heads.head import Head
from jaxdet.models.heads.levels import featmap_sizes_of, flatten_levels
from jaxdet.models.layers.conv import Conv
from jaxdet.models.postprocess import predict_batch
from jaxdet.models.registry import HEADS
from jaxdet.ops.coders import delta_decode, delta_encode
from jaxdet.priors import level_counts, ssd_anchor_grid, ssd_num_base_anchors

AVG_FACTORS = ('device', 'global')

# mmdetection's `bbox_head.cls_convs.i.0` / `reg_convs.i.0` (relative to 'bbox_head.').
TORCH_NAMES = ((r'(cls|reg)_convs\.(\d+)\.0', r'\1_convs_\2'),)

_xavier = nn.initializers.xavier_uniform()


class SSDHeadModule(nn.Module):
  """`feats` (tuple over levels of (B, H_l, W_l, C_l)) -> `(cls, reg)` (see module docstring)."""
  num_classes: int
  num_base_priors: Sequence[int]
  dtype: jnp.dtype = None

  @nn.compact
  def __call__(self, feats, train: bool = False, **unused):
    if len(feats) != len(self.num_base_priors):
      raise ValueError(f'model.head has {len(self.num_base_priors)} levels of priors (ratios) '
                       f'but the neck gives {len(feats)} maps')
    cls_out, reg_out = [], []
    for i, (x, nb) in enumerate(zip(feats, self.num_base_priors)):
      conv = lambda width, name: Conv(width, (3, 3), padding=((1, 1), (1, 1)),
                                      kernel_init=_xavier, name=name, dtype=self.dtype)
      cls_out.append(conv(nb * (self.num_classes + 1), f'cls_convs_{i}')(x))
      reg_out.append(conv(nb * 4, f'reg_convs_{i}')(x))
    return tuple(cls_out), tuple(reg_out)


def num_base_priors(head_cfg):
  """Priors per location of each level: 2 + 2 len(ratios[l]) (SSD300: 4, 6, 6, 6, 4, 4)."""
  return ssd_num_base_anchors(head_cfg.ratios)


def ssd_head_module(head_cfg, num_classes, dtype=None):
  """The SSD network head from `config.model.head`."""
  return SSDHeadModule(num_classes=num_classes, num_base_priors=num_base_priors(head_cfg),
                       dtype=dtype)


def ssd_anchors(head_cfg, featmap_sizes):
  """(A, 4) float32 xyxy priors of all levels in mmdetection's order (level, y, x, prior).
  `head_cfg.min_sizes` / `max_sizes` (pixels, one per level) replace the sizes derived from
  `input_size` and `basesize_ratio_range` when given (non-empty)."""
  sizes = {}
  if head_cfg.get('min_sizes'):
    sizes = dict(min_sizes=tuple(head_cfg.min_sizes), max_sizes=tuple(head_cfg.max_sizes))
  return ssd_anchor_grid(featmap_sizes, strides=tuple(head_cfg.strides),
                         ratios=tuple(tuple(r) for r in head_cfg.ratios),
                         input_size=head_cfg.input_size,
                         basesize_ratio_range=tuple(head_cfg.basesize_ratio_range), **sizes)


def _flat_outputs(outputs, head_cfg):
  cls_out, reg_out = outputs[0], outputs[1]
  nb = num_base_priors(head_cfg)
  num_classes = cls_out[0].shape[-1] // nb[0] - 1
  return (flatten_levels(cls_out, num_classes + 1).astype(jnp.float32),  # (B, A, C + 1)
          flatten_levels(reg_out, 4).astype(jnp.float32), num_classes)   # (B, A, 4)


def ssd_targets(head_cfg, featmap_sizes, batch):
  """(anchors (A, 4), `dense_head.AnchorTargets`) of a batch: SSD's assignment of every image."""
  anchors = ssd_anchors(head_cfg, featmap_sizes)
  assign_one = lambda boxes, labels, mask, valid: max_iou_assign(
      anchors, boxes, labels, mask, pos_iou_thr=head_cfg.pos_iou_thr,
      neg_iou_thr=head_cfg.neg_iou_thr, min_pos_iou=head_cfg.min_pos_iou,
      gt_max_assign_all=head_cfg.gt_max_assign_all, valid=valid)
  return anchors, anchor_targets(assign_one, featmap_sizes, batch,
                                 strides=tuple(head_cfg.strides),
                                 num_base_priors=num_base_priors(head_cfg))


def ssd_loss(outputs, batch, head_cfg, *, axis_name=None):
  """Scalar losses of one device's batch.

  Args:
    outputs: the head's `(cls, reg)`.
    batch: `gt_boxes (B, G, 4)` xyxy input pixels, `gt_labels (B, G)`, `gt_mask (B, G)`,
      `pad_shape (B, 2)`, `image_valid (B,)` (optional).
    head_cfg: `config.model.head` (priors, pos_iou_thr, neg_iou_thr, min_pos_iou,
      gt_max_assign_all, target_means, target_stds, neg_pos_ratio, smoothl1_beta, avg_factor).
    axis_name: the device axis (avg_factor='global' only), or None.
  Returns:
    dict(loss_cls, loss_bbox, num_pos, avg_factor): float32 scalars.
  """
  mode = head_cfg.get('avg_factor', 'device')
  if mode not in AVG_FACTORS:
    raise ValueError(f'model.head.avg_factor={mode!r} must be one of {AVG_FACTORS}')
  cls_logits, deltas, num_classes = _flat_outputs(outputs, head_cfg)
  anchors, t = ssd_targets(head_cfg, featmap_sizes_of(outputs[0]), batch)
  avg_factor = t.avg_factor
  if mode == 'global':
    avg_factor = losses.mean_over_devices(avg_factor, axis_name)

  labels = jnp.where(t.pos, t.assign.labels, num_classes)  # background = C
  per_image = jax.vmap(lambda lg, lb, w: losses.ssd_hard_negative_ce(
      lg, lb, w, neg_pos_ratio=head_cfg.neg_pos_ratio))(cls_logits, labels, t.cls_weights)
  loss_cls = per_image.sum() / avg_factor

  targets = assigned_gt_boxes(batch['gt_boxes'], t.assign.gt_index, anchors)
  target_deltas = delta_encode(anchors[None], targets, means=tuple(head_cfg.target_means),
                               stds=tuple(head_cfg.target_stds))
  target_deltas = jnp.where(t.pos[..., None], target_deltas, 0.)
  loss_bbox = losses.smooth_l1_loss(deltas, target_deltas, t.pos.astype(jnp.float32),
                                    beta=head_cfg.smoothl1_beta, reduction='mean',
                                    avg_factor=avg_factor)
  return dict(loss_cls=loss_cls, loss_bbox=loss_bbox,
              num_pos=t.num_pos_per_image.sum().astype(jnp.float32), avg_factor=avg_factor)


def ssd_predict(outputs, batch, head_cfg, test_cfg):
  """Detections of every image (`Predictions` (B, K, ...)), boxes in original-image pixels.
  `batch` needs img_shape, scale_factor, offset, flip (B, ...)."""
  cls_out, reg_out = outputs[0], outputs[1]
  sizes = featmap_sizes_of(cls_out)
  anchors = ssd_anchors(head_cfg, sizes)
  means, stds = tuple(head_cfg.target_means), tuple(head_cfg.target_stds)
  decode = lambda priors, regs, img_shape: delta_decode(priors, regs, means=means, stds=stds,
                                                        max_shape=img_shape)
  return predict_batch(cls_out, reg_out, None, anchors, decode, batch, test_cfg,
                       level_counts=level_counts(sizes, num_base_priors(head_cfg)),
                       score='softmax')


HEAD = HEADS.register('ssd', Head(module=ssd_head_module, loss=ssd_loss, predict=ssd_predict,
                                  torch_names=TORCH_NAMES))
