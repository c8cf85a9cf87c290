"""RetinaNet head (Lin et al. 2017): mmdetection 3.3's `RetinaHead` -- network, loss and prediction.

Network: `DenseHead` without normalisation (`head.norm=''`; 'gn' is mmdetection's
`norm_cfg=dict(type='GN', num_groups=head.gn_groups)`: GroupNorm after each tower conv, which
then has no bias), `len(ratios) * scales_per_octave` (= 9) anchors per location, no `Scale`, no
centerness; class bias -log(99) (prior 0.01) (`retina_head_module`).
Outputs, per level: cls (B, H_l, W_l, 9 * C) logits and reg (B, H_l, W_l, 9 * 4) deltas, channel
`a * C + c` (resp. `a * 4 + k`) for base anchor `a`, as mmdetection's permute + reshape.

Loss (`retina_loss`, a pure function of the head outputs and the batch), per device:
  - anchors: `anchor_grid(octave_base_scale=4, scales_per_octave=3, ratios=(0.5, 1, 2))`,
    mmdetection's order (level, y, x, base anchor; base anchors ratio-major); each image's valid
    flags from its own padded shape (`allowed_border=-1`: no inside-the-image test);
  - `max_iou_assign` (pos 0.5, neg 0.4, min_pos_iou 0, low-quality matches to all tied anchors)
    vmapped over the images (PseudoSampler: no sampling);
  - focal loss (alpha 0.25, gamma 2, weight 1) over every valid, non-ignored anchor (positives
    with their class, negatives as background);
  - L1 loss (weight 1) between the predicted deltas of the positives and their gts' DeltaXYWH
    encodings against the anchors (means 0, stds 1), summed over the 4 coordinates.
  Both are divided by `avg_factor`. `head_cfg.avg_factor` picks it:
    'device' (default, mmdetection's): sum over this device's images of max(num_pos, 1)
      (`SamplingResult.avg_factor` with the PseudoSampler, summed by `AnchorHead.get_targets`);
      no cross-device mean (unlike ATSS / FCOS), so each device's loss is normalised by its own
      positives and the gradient mean then averages those per-device losses;
    'global': the mean over devices (`mean_over_devices`, axis `axis_name`) of that number, as
      the ATSS / FCOS heads do: every positive then weighs the same on all devices.
  On one device (`axis_name=None`) both are the same.
"""
import jax.numpy as jnp

from jaxdet import losses
from jaxdet.assigners.max_iou import max_iou_assign
from jaxdet.models.heads.dense_head import (DENSE_HEAD_TORCH_NAMES, DenseHead, anchor_targets,
                                            assigned_gt_boxes)
from jaxdet.models.heads.head import Head
from jaxdet.models.heads.levels import featmap_sizes_of, flatten_levels
from jaxdet.models.postprocess import predict_batch
from jaxdet.models.registry import HEADS
from jaxdet.ops.coders import delta_decode, delta_encode
from jaxdet.priors import anchor_grid

AVG_FACTORS = ('device', 'global')


def num_base_anchors(head_cfg):
  """Anchors per location: len(ratios) * scales_per_octave (RetinaNet: 3 x 3 = 9)."""
  return len(head_cfg.ratios) * head_cfg.scales_per_octave


def retina_head_module(head_cfg, num_classes, dtype=None):
  """The RetinaNet network head from `config.model.head`."""
  return DenseHead(num_classes=num_classes, num_anchors=num_base_anchors(head_cfg),
                   num_levels=len(head_cfg.strides), feat_channels=head_cfg.feat_channels,
                   num_convs=head_cfg.num_convs, norm=head_cfg.get('norm') or None,
                   gn_groups=head_cfg.get('gn_groups', 32), use_scale=False, centerness=None,
                   dtype=dtype)


def retina_anchors(head_cfg, featmap_sizes):
  """(A, 4) float32 xyxy anchors of all levels, A = sum_l H_l W_l * 9, mmdetection's order."""
  return anchor_grid(featmap_sizes, strides=tuple(head_cfg.strides),
                     ratios=tuple(head_cfg.ratios),
                     octave_base_scale=head_cfg.octave_base_scale,
                     scales_per_octave=head_cfg.scales_per_octave)


def retina_loss(outputs, batch, head_cfg, *, axis_name=None):
  """Scalar losses of one device's batch.

  Args:
    outputs: the head's `(cls, reg, None)`, cls / reg tuples over levels of (B, H_l, W_l, 9 * C)
      and (B, H_l, W_l, 9 * 4).
    batch: `gt_boxes (B, G, 4)` xyxy input pixels, `gt_labels (B, G)`, `gt_mask (B, G)`,
      `pad_shape (B, 2)` (h, w), `image_valid (B,)` (images with False add nothing).
    head_cfg: `config.model.head` (strides, ratios, octave_base_scale, scales_per_octave,
      pos_iou_thr, neg_iou_thr, min_pos_iou, target_means, target_stds, focal_alpha,
      focal_gamma, loss_cls_weight, loss_bbox_weight, avg_factor ('device' or 'global')).
    axis_name: the device axis (used by avg_factor='global' only), or None.
  Returns:
    dict(loss_cls, loss_bbox, num_pos, avg_factor), each a float32 scalar (num_pos: positives
    of this device's batch; avg_factor: the normaliser used).
  """
  cls_out, reg_out = outputs[0], outputs[1]
  mode = head_cfg.get('avg_factor', 'device')
  if mode not in AVG_FACTORS:
    raise ValueError(f"model.head.avg_factor={mode!r} must be one of {AVG_FACTORS}")
  sizes = featmap_sizes_of(cls_out)
  nb = num_base_anchors(head_cfg)
  num_classes = cls_out[0].shape[-1] // nb
  anchors = retina_anchors(head_cfg, sizes)
  cls_logits = flatten_levels(cls_out, num_classes).astype(jnp.float32)  # (B, A, C)
  deltas = flatten_levels(reg_out, 4).astype(jnp.float32)                # (B, A, 4)

  assign_one = lambda boxes, labels, mask, valid: max_iou_assign(
      anchors, boxes, labels, mask, pos_iou_thr=head_cfg.pos_iou_thr,
      neg_iou_thr=head_cfg.neg_iou_thr, min_pos_iou=head_cfg.min_pos_iou, valid=valid)
  t = anchor_targets(assign_one, sizes, batch, strides=head_cfg.strides, num_base_priors=nb)
  pos, assign = t.pos, t.assign                               # (B, A)
  avg_factor = t.avg_factor
  if mode == 'global':
    avg_factor = losses.mean_over_devices(avg_factor, axis_name)

  loss_cls = losses.sigmoid_focal_loss(cls_logits, assign.labels, t.cls_weights,
                                       alpha=head_cfg.focal_alpha, gamma=head_cfg.focal_gamma,
                                       reduction='mean', avg_factor=avg_factor)

  targets = assigned_gt_boxes(batch['gt_boxes'], assign.gt_index, anchors)  # (B, A, 4)
  target_deltas = delta_encode(anchors[None], targets, means=tuple(head_cfg.target_means),
                               stds=tuple(head_cfg.target_stds))
  target_deltas = jnp.where(pos[..., None], target_deltas, 0.)
  loss_bbox = losses.l1_loss(deltas, target_deltas, pos.astype(jnp.float32), reduction='mean',
                             avg_factor=avg_factor)
  return dict(loss_cls=head_cfg.loss_cls_weight * loss_cls,
              loss_bbox=head_cfg.loss_bbox_weight * loss_bbox,
              num_pos=t.num_pos_per_image.sum().astype(jnp.float32),
              avg_factor=avg_factor)


def retina_predict(outputs, batch, head_cfg, test_cfg):
  """Detections of every image of the batch (`Predictions` with a leading batch axis), boxes in
  original-image pixels. `batch` needs img_shape, scale_factor, offset, flip (B, ...).
  Deltas are decoded (DeltaXYWH, clipped to each image's img_shape) only for the kept anchors."""
  cls_out, reg_out = outputs[0], outputs[1]
  anchors = retina_anchors(head_cfg, featmap_sizes_of(cls_out))
  means, stds = tuple(head_cfg.target_means), tuple(head_cfg.target_stds)
  decode = lambda priors, regs, img_shape: delta_decode(priors, regs, means=means, stds=stds,
                                                        max_shape=img_shape)
  return predict_batch(cls_out, reg_out, None, anchors, decode, batch, test_cfg,
                       num_base_priors=num_base_anchors(head_cfg))


# mmdetection's RetinaHead names (bbox_head.*), for checkpoint conversion.
TORCH_NAMES = DENSE_HEAD_TORCH_NAMES + ((r'retina_(cls|reg)', r'conv_\1'),)

HEAD = HEADS.register('retinanet', Head(module=retina_head_module, loss=retina_loss,
                                        predict=retina_predict, torch_names=TORCH_NAMES))
