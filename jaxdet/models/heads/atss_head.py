"""ATSS head (Zhang et al. 2020): mmdetection 3.3's `ATSSHead` -- network, loss and prediction.

Network: `DenseHead` with GroupNorm towers, one anchor per location, a `Scale` per level on the
box branch and the centerness branch off the box tower (`atss_head_module`).

Loss (`atss_loss`, a pure function of the head outputs and the batch), per device:
  - anchors: `anchor_grid(octave_base_scale=8, scales_per_octave=1, ratios=(1,))`; each image's
    valid flags from its own padded shape; `atss_assign` (topk 9) vmapped over the images;
  - focal loss (alpha 0.25, gamma 2, weight 1) over every valid anchor (positives and negatives);
  - GIoU loss (weight 2) between the decoded positive boxes (DeltaXYWH, stds 0.1, 0.1, 0.2, 0.2)
    and their gts, weighted by the centerness targets;
  - centerness BCE (weight 1) on positives against the centerness targets of their anchors.
  Normalisers as mmdetection: focal and centerness by `avg_factor` = the mean over devices of
  sum_images max(num_pos, 1); GIoU by max(1, the mean over devices of the sum of the centerness
  targets). `axis_name` names the device axis for those means (None: one device).
"""
import jax
import jax.numpy as jnp

from jaxdet import losses
from jaxdet.assigners.atss import atss_assign
from jaxdet.models.heads.dense_head import (DENSE_HEAD_TORCH_NAMES, DenseHead, anchor_targets,
                                            assigned_gt_boxes)
from jaxdet.models.heads.head import Head
from jaxdet.models.heads.levels import featmap_sizes_of, flatten_levels
from jaxdet.models.postprocess import predict_batch
from jaxdet.models.registry import HEADS
from jaxdet.ops.coders import delta_decode
from jaxdet.priors import anchor_grid


def atss_head_module(head_cfg, num_classes, dtype=None):
  """The ATSS network head from `config.model.head`."""
  return DenseHead(num_classes=num_classes, num_anchors=1, num_levels=len(head_cfg.strides),
                   feat_channels=head_cfg.feat_channels, num_convs=head_cfg.num_convs,
                   norm='gn', gn_groups=head_cfg.get('gn_groups', 32), use_scale=True,
                   centerness='reg', dtype=dtype)


def _anchors(head_cfg, featmap_sizes):
  return anchor_grid(featmap_sizes, strides=tuple(head_cfg.strides), ratios=(1.0,),
                     octave_base_scale=head_cfg.octave_base_scale,
                     scales_per_octave=head_cfg.scales_per_octave)


def atss_loss(outputs, batch, head_cfg, *, axis_name=None):
  """Scalar losses of one device's batch.

  Args:
    outputs: the head's `(cls, reg, centerness)`, each a tuple over levels of (B, H_l, W_l, .).
    batch: `gt_boxes (B, G, 4)`, `gt_labels (B, G)`, `gt_mask (B, G)`, `pad_shape (B, 2)`,
      `image_valid (B,)` (images with False add nothing).
    head_cfg: `config.model.head` (strides, octave_base_scale, scales_per_octave, topk,
      target_stds, loss weights and focal alpha/gamma).
  Returns:
    dict(loss_cls, loss_bbox, loss_centerness, num_pos), each a float32 scalar.
  """
  cls_out, reg_out, ctr_out = outputs
  sizes = featmap_sizes_of(cls_out)
  anchors = _anchors(head_cfg, sizes)
  cls_logits = flatten_levels(cls_out, cls_out[0].shape[-1]).astype(jnp.float32)
  deltas = flatten_levels(reg_out, 4).astype(jnp.float32)
  ctr_logits = flatten_levels(ctr_out, 1)[..., 0].astype(jnp.float32)

  assign_one = lambda boxes, labels, mask, valid: atss_assign(
      anchors, boxes, labels, mask, sizes, topk=head_cfg.topk, valid=valid)
  t = anchor_targets(assign_one, sizes, batch, strides=head_cfg.strides)
  pos, assign = t.pos, t.assign                               # (B, A)
  avg_factor = losses.mean_over_devices(t.avg_factor, axis_name)
  loss_cls = losses.sigmoid_focal_loss(cls_logits, assign.labels, t.cls_weights,
                                       alpha=head_cfg.focal_alpha, gamma=head_cfg.focal_gamma,
                                       reduction='mean', avg_factor=avg_factor)

  targets = assigned_gt_boxes(batch['gt_boxes'], assign.gt_index, anchors)  # (B, A, 4)
  ctr_x = (anchors[:, 0] + anchors[:, 2]) / 2
  ctr_y = (anchors[:, 1] + anchors[:, 3]) / 2
  ltrb = jnp.stack([ctr_x - targets[..., 0], ctr_y - targets[..., 1],
                    targets[..., 2] - ctr_x, targets[..., 3] - ctr_y], axis=-1)
  ctr_targets = jnp.where(pos, losses.centerness_target(ltrb), 0.)
  ctr_targets = jax.lax.stop_gradient(ctr_targets)
  boxes = delta_decode(anchors[None], deltas, stds=tuple(head_cfg.target_stds))
  bbox_avg = jnp.maximum(losses.mean_over_devices(ctr_targets.sum(), axis_name), 1.)
  loss_bbox = losses.giou_loss(boxes, targets, ctr_targets, reduction='sum') / bbox_avg
  loss_ctr = losses.binary_cross_entropy_with_logits(ctr_logits, ctr_targets,
                                                     pos.astype(jnp.float32), reduction='mean',
                                                     avg_factor=avg_factor)
  return dict(loss_cls=head_cfg.loss_cls_weight * loss_cls,
              loss_bbox=head_cfg.loss_bbox_weight * loss_bbox,
              loss_centerness=head_cfg.loss_centerness_weight * loss_ctr,
              num_pos=t.num_pos_per_image.sum().astype(jnp.float32))


def atss_predict(outputs, batch, head_cfg, test_cfg):
  """Detections of every image of the batch (`Predictions` with a leading batch axis), boxes in
  original-image pixels. `batch` needs img_shape, scale_factor, offset, flip (B, ...)."""
  cls_out, reg_out, ctr_out = outputs
  anchors = _anchors(head_cfg, featmap_sizes_of(cls_out))
  stds = tuple(head_cfg.target_stds)
  decode = lambda priors, regs, img_shape: delta_decode(priors, regs, stds=stds,
                                                        max_shape=img_shape)
  return predict_batch(cls_out, reg_out, ctr_out, anchors, decode, batch, test_cfg)


# mmdetection's ATSSHead names (bbox_head.*), for checkpoint conversion.
TORCH_NAMES = DENSE_HEAD_TORCH_NAMES + ((r'atss_(cls|reg|centerness)', r'conv_\1'),)

HEAD = HEADS.register('atss', Head(module=atss_head_module, loss=atss_loss,
                                   predict=atss_predict, torch_names=TORCH_NAMES))
