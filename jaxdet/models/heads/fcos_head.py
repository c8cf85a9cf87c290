"""FCOS head (Tian et al. 2019): mmdetection 3.3's `FCOSHead` -- network, loss and prediction.

Network (`fcos_head_module`): `DenseHead` with GroupNorm towers, one point per location, a
`Scale` per level on the box branch, and the centerness branch off the classification tower
(`centerness_on_reg=True`: off the box tower).

Regression: the head's raw output `x` (already multiplied by its level's `Scale`) gives the
(left, top, right, bottom) distances from the point to the box sides as mmdetection's
`forward_single` does: `exp(x)` in input pixels, or with `norm_on_bbox` `relu(x)` in units of
the level's stride (multiplied by the stride at test time) -- `reg_to_distances`.

Points: `point_grid(featmap_sizes, strides)` -- (x, y) = ((j + 0.5) s, (i + 0.5) s), levels
concatenated in the order (level, y, x), over the whole padded batch (FCOS has no valid flags).

Loss (`fcos_loss`, a pure function of the head outputs and the batch), per device:
  - targets: `fcos_assign` vmapped over the images (regress ranges per level, optional centre
    sampling and `norm_on_bbox`);
  - focal loss (alpha 0.25, gamma 2, weight 1) over every point, normalised by
    num_pos = max(the mean over devices of this device's positive count, 1);
  - IoU loss (-log IoU, eps 1e-6, weight 1) between the decoded positive predictions and
    targets, weighted by the centerness targets, normalised by max(the mean over devices of
    their sum, 1e-6);
  - centerness BCE (weight 1) on positives against the centerness targets, normalised by num_pos.
  With no positives the box and centerness losses are 0, as in mmdetection. `axis_name` names the
  device axis for those means (None: one device).

Predict (`fcos_predict`): mmdetection's `_predict_by_feat_single` via `predict_batch`: sigmoid
scores, score_thr / nms_pre per level, distances decoded at the points and clipped to the image,
scores x sigmoid(centerness), class-aware NMS, max_per_img; boxes in original-image pixels.

`config.model.head` keys: strides, regress_ranges, feat_channels, num_convs, gn_groups,
centerness_on_reg, center_sampling, center_sample_radius, norm_on_bbox, focal_alpha,
focal_gamma, loss_cls_weight, loss_bbox_weight, loss_centerness_weight (see
configs/_base_/fcos_r50_caffe_fpn_gn.py).
"""
import jax
import jax.numpy as jnp

from jaxdet import losses
from jaxdet.assigners.fcos import fcos_assign
from jaxdet.models.heads.dense_head import DENSE_HEAD_TORCH_NAMES, DenseHead
from jaxdet.models.heads.head import Head, image_valid
from jaxdet.models.heads.levels import featmap_sizes_of, flatten_levels
from jaxdet.models.postprocess import predict_batch
from jaxdet.models.registry import HEADS
from jaxdet.ops.coders import distance_decode
from jaxdet.priors import level_counts, point_grid


def fcos_head_module(head_cfg, num_classes, dtype=None):
  """The FCOS network head from `config.model.head`."""
  return DenseHead(num_classes=num_classes, num_anchors=1, num_levels=len(head_cfg.strides),
                   feat_channels=head_cfg.feat_channels, num_convs=head_cfg.num_convs,
                   norm='gn', gn_groups=head_cfg.get('gn_groups', 32), use_scale=True,
                   centerness='reg' if head_cfg.get('centerness_on_reg', False) else 'cls',
                   dtype=dtype)


def reg_to_distances(reg, norm_on_bbox):
  """Raw (scaled) regression (..., 4) -> non-negative (l, t, r, b) distances, float32:
  `exp` (pixels), or `relu` (stride units) with `norm_on_bbox` (as mmdetection's
  `forward_single` in training; `fcos_predict` multiplies by the stride afterwards)."""
  reg = reg.astype(jnp.float32)
  return jax.nn.relu(reg) if norm_on_bbox else jnp.exp(reg)


def _regress_ranges(head_cfg):
  return tuple((float(lo), float(hi)) for lo, hi in head_cfg.regress_ranges)


def fcos_loss(outputs, batch, head_cfg, *, axis_name=None):
  """Scalar losses of one device's batch.

  Args:
    outputs: the head's `(cls, reg, centerness)`, each a tuple over levels of (B, H_l, W_l, .):
      class logits (C), raw scaled regression (4), centerness logits (1).
    batch: `gt_boxes (B, G, 4)` xyxy input pixels, `gt_labels (B, G)`, `gt_mask (B, G)`,
      `image_valid (B,)` (images with False add nothing).
    head_cfg: `config.model.head`.
    axis_name: the device axis for mmdetection's `reduce_mean` of the normalisers, or None.
  Returns:
    dict(loss_cls, loss_bbox, loss_centerness, num_pos), each a float32 scalar (num_pos: this
    device's positive points, all images).
  """
  cls_out, reg_out, ctr_out = outputs
  sizes = featmap_sizes_of(cls_out)
  strides = tuple(head_cfg.strides)
  points = jnp.asarray(point_grid(sizes, strides=strides))        # (P, 2)
  cls_logits = flatten_levels(cls_out, cls_out[0].shape[-1]).astype(jnp.float32)  # (B, P, C)
  raw_reg = flatten_levels(reg_out, 4).astype(jnp.float32)         # (B, P, 4)
  ctr_logits = flatten_levels(ctr_out, 1)[..., 0].astype(jnp.float32)  # (B, P)
  norm_on_bbox = head_cfg.get('norm_on_bbox', False)

  assign_one = lambda boxes, labels, mask: fcos_assign(
      points, boxes, labels, mask, num_level_points=level_counts(sizes, 1), strides=strides,
      regress_ranges=_regress_ranges(head_cfg),
      center_sampling=head_cfg.get('center_sampling', False),
      center_sample_radius=head_cfg.get('center_sample_radius', 1.5), norm_on_bbox=norm_on_bbox)
  # FCOS (as mmdetection) has no valid flags: every point of a real image is a positive or a
  # negative, also in its padding; an image with image_valid False adds nothing.
  real = image_valid(batch)
  targets = jax.vmap(assign_one)(batch['gt_boxes'], batch['gt_labels'],
                                 batch['gt_mask'] & real[:, None])
  pos = targets.gt_index >= 0                                      # (B, P)
  num_pos = pos.sum().astype(jnp.float32)
  avg_factor = jnp.maximum(losses.mean_over_devices(num_pos, axis_name), 1.)

  loss_cls = losses.sigmoid_focal_loss(cls_logits, targets.labels,
                                       jnp.broadcast_to(real[:, None], pos.shape).astype(
                                           jnp.float32),
                                       alpha=head_cfg.focal_alpha, gamma=head_cfg.focal_gamma,
                                       reduction='mean', avg_factor=avg_factor)

  # Only positives are decoded: elsewhere the raw output is replaced by 0 before exp, so that
  # neither an overflowing exp nor its gradient can reach the (zero-weighted) sum.
  dist = reg_to_distances(jnp.where(pos[..., None], raw_reg, 0.), norm_on_bbox)
  pred_boxes = distance_decode(points[None], dist)
  target_boxes = distance_decode(points[None], targets.bbox_targets)
  ctr_targets = jax.lax.stop_gradient(targets.centerness_targets)  # 0 off positives
  ctr_denorm = jnp.maximum(losses.mean_over_devices(ctr_targets.sum(), axis_name), 1e-6)
  loss_bbox = losses.iou_loss(pred_boxes, target_boxes, ctr_targets, mode='log', eps=1e-6,
                              reduction='mean', avg_factor=ctr_denorm)
  loss_ctr = losses.binary_cross_entropy_with_logits(ctr_logits, ctr_targets,
                                                     pos.astype(jnp.float32), reduction='mean',
                                                     avg_factor=avg_factor)
  return dict(loss_cls=head_cfg.loss_cls_weight * loss_cls,
              loss_bbox=head_cfg.loss_bbox_weight * loss_bbox,
              loss_centerness=head_cfg.loss_centerness_weight * loss_ctr,
              num_pos=num_pos)


def fcos_predict(outputs, batch, head_cfg, test_cfg):
  """Detections of every image of the batch (`Predictions` with a leading batch axis), boxes in
  original-image pixels. `batch` needs img_shape, scale_factor, offset, flip (B, ...)."""
  cls_out, reg_out, ctr_out = outputs
  priors = point_grid(featmap_sizes_of(cls_out), strides=tuple(head_cfg.strides),
                      with_stride=True)                           # (P, 4): x, y, stride_w, _h
  norm_on_bbox = head_cfg.get('norm_on_bbox', False)

  def decode(priors, regs, img_shape):
    return distance_decode(priors[:, :2], reg_to_distances(regs, norm_on_bbox),
                           max_shape=img_shape, stride=priors[:, 2] if norm_on_bbox else None)

  return predict_batch(cls_out, reg_out, ctr_out, jnp.asarray(priors), decode, batch, test_cfg)


# mmdetection's FCOSHead names (bbox_head.*), for checkpoint conversion.
TORCH_NAMES = DENSE_HEAD_TORCH_NAMES + ((r'conv_(cls|reg|centerness)', r'conv_\1'),)

HEAD = HEADS.register('fcos', Head(module=fcos_head_module, loss=fcos_loss,
                                   predict=fcos_predict, torch_names=TORCH_NAMES))
