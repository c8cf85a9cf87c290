"""DETR's loss: Hungarian matching and the set loss of every decoder layer, as mmdetection 3.3's
`DETRHead.loss_by_feat` with its `HungarianAssigner`, inside the jitted step (no host work).

For every decoder layer l and image b (all at once, fixed shapes):
  - matching cost (Q, G), as mmdetection's match costs (`detr_cost`):
      match_cls_weight  x -softmax(logits)[q, label_g]                         (ClassificationCost)
    + match_bbox_weight x ||pred_q - gt_g||_1 on normalised (cx, cy, w, h)    (BBoxL1Cost, 'xywh')
    + match_iou_weight  x -GIoU(pred_q, gt_g) in input pixels (eps 1e-6)       (IoUCost, 'giou')
    (weights 1, 5, 2); `jaxdet.assigners.hungarian_match` pairs min(Q, #gts) queries with gts
    at the least total cost; padded gts (gt_mask False) never match. An image with more real
    gts than queries leaves the extra gts unmatched, as mmdetection does (`detr_loss` warns once
    per trace and reports `num_unmatched_gts`).
  - labels: the matched gt's class, `num_classes` (background) for the other queries.
  - loss_cls = sum of softmax CE x class weight (1 per class, `bg_cls_weight` 0.1 for background)
    over this device's queries / max(num_pos + 0.1 num_neg, 1) (this device's counts, not
    synchronised: mmdetection's `sync_cls_avg_factor=False`);
  - loss_bbox = sum over matched queries of |pred - target| (normalised cxcywh, 4 coordinates),
    loss_iou = sum over matched queries of 1 - GIoU (pixels of the image's `img_shape`, eps 1e-6),
    both / max(mean over devices of num_pos, 1) (mmdetection's `reduce_mean(num_total_pos)`);
    num_pos is the number of matched queries (= real gts while they are at most Q);
  - x `loss_cls_weight` (1), `loss_bbox_weight` (5), `loss_iou_weight` (2).
Keys: the last layer's `loss_cls`, `loss_bbox`, `loss_iou` (mmdetection's names); the other layers'
`loss_cls_d0` ... `loss_iou_d4` (mmdetection: `d0.loss_cls`; jaxdet sums the keys starting with
'loss_'); and metrics `num_pos` (last layer) and `num_unmatched_gts` (last layer).

Images with `image_valid` False add nothing (no positives, no negatives); an image without boxes
adds only background CE terms.
"""
import logging

import jax
import jax.numpy as jnp

from jaxdet import losses
from jaxdet.assigners.hungarian import hungarian_match
from jaxdet.models.heads.head import image_valid
from jaxdet.ops.boxes import (box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, generalized_box_iou,
                              generalized_box_iou_aligned)

log = logging.getLogger('jaxdet')
GIOU_EPS = 1e-6  # mmdetection's GIoULoss and bbox_overlaps default

_warned_unmatched = set()


def detr_cost(cls_scores, bbox_preds, gt_labels, gt_boxes_px, factor, *, cls_weight=1.,
              bbox_weight=5., iou_weight=2.):
  """mmdetection's HungarianAssigner cost for DETR, batched over leading axes.

  Args:
    cls_scores: (..., Q, C + 1) logits.
    bbox_preds: (..., Q, 4) normalised cxcywh.
    gt_labels: (..., G) int in [0, C) (padded rows: any value in range).
    gt_boxes_px: (..., G, 4) xyxy input pixels (padded rows: any finite box).
    factor: (..., 1, 4) (w, h, w, h) of each image's img_shape.
  Returns:
    (..., Q, G) float32.
  """
  prob = jax.nn.softmax(cls_scores.astype(jnp.float32), axis=-1)
  cost_cls = -jnp.take_along_axis(prob, jnp.broadcast_to(
      gt_labels[..., None, :], prob.shape[:-1] + gt_labels.shape[-1:]), axis=-1)
  gt_norm = box_xyxy_to_cxcywh(gt_boxes_px) / factor
  cost_bbox = jnp.abs(bbox_preds[..., :, None, :] - gt_norm[..., None, :, :]).sum(-1)
  pred_px = box_cxcywh_to_xyxy(bbox_preds) * factor
  cost_iou = -generalized_box_iou(pred_px, gt_boxes_px, eps=GIOU_EPS)
  return cls_weight * cost_cls + bbox_weight * cost_bbox + iou_weight * cost_iou


def match(cost, col_mask, method='auto'):
  """(..., Q) int32 gt index of each query, -1 for none: one batched `hungarian_match` call
  over every leading axis (decoder layers x images); `col_mask` (B, G) broadcasts. Named
  'hungarian_match' in the HLO (experiments/profile_step.py reports its share of the step)."""
  with jax.named_scope('hungarian_match'):
    return hungarian_match(cost, col_mask, method=method)[0]


def detr_loss(outputs, batch, head_cfg, *, axis_name=None):
  """The 6 x 3 loss terms of one device's batch (module docstring).

  Args:
    outputs: `(cls_scores (L, B, Q, C + 1), bbox_preds (L, B, Q, 4))` of `DETRHead`.
    batch: gt_boxes (B, G, 4) xyxy input pixels, gt_labels (B, G), gt_mask (B, G), img_shape
      (B, 2) (h, w), image_valid (B,) (optional).
    head_cfg: `config.model.head` (bg_cls_weight, loss_*_weight, match_*_weight, match_method).
    axis_name: the device axis for the box-loss normaliser, or None.
  """
  cls_scores, bbox_preds = outputs
  cls_scores = cls_scores.astype(jnp.float32)
  bbox_preds = bbox_preds.astype(jnp.float32)
  num_layers, _, num_queries, num_logits = cls_scores.shape
  num_classes = num_logits - 1
  valid_img = image_valid(batch)                                     # (B,)
  gt_mask = jnp.asarray(batch['gt_mask'], bool) & valid_img[:, None]  # (B, G)
  gt_labels = jnp.clip(jnp.asarray(batch['gt_labels'], jnp.int32), 0, num_classes - 1)
  img_hw = jnp.asarray(batch['img_shape'], jnp.float32)
  factor = jnp.stack([img_hw[:, 1], img_hw[:, 0], img_hw[:, 1], img_hw[:, 0]], -1)[:, None]
  safe_box = jnp.concatenate([factor[..., :2] * 0.25, factor[..., :2] * 0.75], -1)  # (B, 1, 4)
  gt_boxes = jnp.where(gt_mask[..., None], jnp.asarray(batch['gt_boxes'], jnp.float32),
                       safe_box)
  num_gts = gt_mask.shape[-1]
  if num_gts > num_queries and (num_gts, num_queries) not in _warned_unmatched:
    _warned_unmatched.add((num_gts, num_queries))
    log.warning(f'DETR: up to {num_gts} gts per image (data.max_gt) but {num_queries} queries '
                '(model.head.num_queries): gts beyond the number of queries stay unmatched, as in '
                'mmdetection (counted in the metric num_unmatched_gts)')

  cost = detr_cost(jax.lax.stop_gradient(cls_scores), jax.lax.stop_gradient(bbox_preds),
                   gt_labels[None], gt_boxes[None], factor[None],
                   cls_weight=head_cfg.get('match_cls_weight', 1.),
                   bbox_weight=head_cfg.get('match_bbox_weight', 5.),
                   iou_weight=head_cfg.get('match_iou_weight', 2.))
  matched = match(cost, gt_mask, head_cfg.get('match_method', 'auto'))  # (L, B, Q)
  pos = matched >= 0
  safe = jnp.maximum(matched, 0)
  labels = jnp.where(pos, jnp.take_along_axis(gt_labels[None], safe, axis=2), num_classes)
  target_px = jnp.take_along_axis(gt_boxes[None], safe[..., None], axis=2)  # (L, B, Q, 4)
  target = box_xyxy_to_cxcywh(target_px / factor)

  class_weight = jnp.ones((num_logits,), jnp.float32).at[num_classes].set(
      head_cfg.get('bg_cls_weight', 0.1))
  query_weight = jnp.broadcast_to(valid_img[:, None], pos.shape[1:]).astype(jnp.float32)
  pred_px = box_cxcywh_to_xyxy(bbox_preds) * factor
  out = {}
  for l in range(num_layers):
    num_pos = pos[l].sum().astype(jnp.float32)
    num_neg = query_weight.sum() - num_pos
    cls_avg = jnp.maximum(num_pos + class_weight[num_classes] * num_neg, 1.)
    loss_cls = losses.cross_entropy(cls_scores[l], labels[l], query_weight,
                                    class_weight=class_weight, avg_factor=cls_avg)
    box_avg = jnp.maximum(losses.mean_over_devices(num_pos, axis_name), 1.)
    w = pos[l].astype(jnp.float32)
    loss_bbox = losses.l1_loss(bbox_preds[l], target[l], w, avg_factor=box_avg)
    giou = generalized_box_iou_aligned(pred_px[l], target_px[l], eps=GIOU_EPS)
    loss_iou = losses.reduce_loss(1. - giou, w, avg_factor=box_avg)
    suffix = '' if l == num_layers - 1 else f'_d{l}'
    out['loss_cls' + suffix] = head_cfg.get('loss_cls_weight', 1.) * loss_cls
    out['loss_bbox' + suffix] = head_cfg.get('loss_bbox_weight', 5.) * loss_bbox
    out['loss_iou' + suffix] = head_cfg.get('loss_iou_weight', 2.) * loss_iou
  out['num_pos'] = pos[-1].sum().astype(jnp.float32)
  out['num_unmatched_gts'] = gt_mask.sum().astype(jnp.float32) - out['num_pos']
  return out
