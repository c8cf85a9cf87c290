"""MaxIoU assigner: mmdetection 3.3's ``MaxIoUAssigner`` for one image (RetinaNet, SSD, NAS-FCOS).

mmdetection's rules, in its order (later steps overwrite earlier ones):

1. every prior starts ignored;
2. a prior whose largest IoU with any gt lies in ``[0, neg_iou_thr)`` (or in
   ``[neg_iou_thr[0], neg_iou_thr[1])`` for a tuple) becomes background;
3. a prior whose largest IoU is ``>= pos_iou_thr`` takes that gt (the first gt on ties, as
   ``torch.max``);
4. low-quality matches: for each gt ``i = 0, 1, ...`` in turn whose best IoU is
   ``>= min_pos_iou``, the priors that reach that best IoU (all of them with
   ``gt_max_assign_all``, else only the first) are given gt ``i``, overwriting step 3 and
   earlier gts. So a prior that is the best prior of several gts ends with the *highest*
   such gt index: that is how the loop is reproduced here without one.

Padded gts (``gt_mask`` False) and invalid priors (``valid`` False; mmdetection drops them
before assigning) enter as IoU ``-1``: they are nobody's maximum and never pass a threshold.
Note mmdetection's quirk, kept: with ``min_pos_iou = 0`` a gt that overlaps no prior at all
has best IoU 0 and takes every prior with IoU 0 when ``gt_max_assign_all``.
"""
import numbers

import jax.numpy as jnp

from jaxdet.assigners.assignment import BACKGROUND, IGNORED, Assignment, check_inputs
from jaxdet.ops.boxes import box_iou


def max_iou_assign(anchors, gt_boxes, gt_labels, gt_mask, *, pos_iou_thr, neg_iou_thr,
                   min_pos_iou=0., gt_max_assign_all=True, match_low_quality=True,
                   valid=None):
  """Assigns each prior to a gt, background or ignore, exactly as mmdetection's MaxIoUAssigner.

  Args:
    anchors: (A, 4) float32, xyxy, input pixels (any priors: anchors, SSD priors, proposals).
    gt_boxes: (G, 4) float32, xyxy, input pixels; rows where ``gt_mask`` is False are ignored.
    gt_labels: (G,) int32 class of each gt.
    gt_mask: (G,) bool, True for real gts.
    pos_iou_thr: priors with max IoU >= this are positive.
    neg_iou_thr: float (negatives have max IoU in [0, thr)) or a pair (lo, hi): [lo, hi).
    min_pos_iou: a gt's best priors are made positive (step 4) only if its best IoU >= this.
    gt_max_assign_all: step 4 gives the gt all priors tied at its best IoU (else the first).
    match_low_quality: run step 4 at all.
    valid: optional (A,) bool; invalid priors are never candidates and come out ignored.
      Default: every prior whose x1 is not NaN.

  Returns:
    ``Assignment`` with (A,) ``gt_index`` (>= 0 gt row, -1 background, -2 ignored),
    ``labels`` (-1 unless positive) and ``max_overlap`` (each prior's largest IoU with a real
    gt, mmdetection's ``max_overlaps``; 0 when the image has no gt and for invalid priors).

  RetinaNet: ``pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0``.
  SSD: ``pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0, gt_max_assign_all=False``.
  """
  neg_lo, neg_hi = _check_args(anchors, gt_boxes, gt_labels, gt_mask, valid, pos_iou_thr,
                               neg_iou_thr, min_pos_iou)
  num_anchors, num_gts = anchors.shape[0], gt_boxes.shape[0]
  anchors = jnp.asarray(anchors, jnp.float32)
  gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
  gt_mask = jnp.asarray(gt_mask, bool)
  if valid is None:  # a runtime mask (not a constant XLA would fold away; see _iou_as_mmdet)
    valid = ~jnp.isnan(anchors[:, 0])
  valid = jnp.asarray(valid, bool)

  iou = _iou_as_mmdet(anchors, gt_boxes, valid, gt_mask)  # (A, G); -1 for masked pairs

  max_overlap = iou.max(axis=1)
  argmax_gt = iou.argmax(axis=1).astype(jnp.int32)  # first gt on ties, as torch.max
  gt_max = iou.max(axis=0)  # (G,); -1 for padded gts

  gt_index = jnp.full((num_anchors,), IGNORED, jnp.int32)
  negative = (max_overlap >= neg_lo) & (max_overlap < neg_hi)
  gt_index = jnp.where(negative, BACKGROUND, gt_index)
  gt_index = jnp.where(max_overlap >= pos_iou_thr, argmax_gt, gt_index)

  if match_low_quality:
    # gt_max >= 0 holds for every real gt when any prior is valid (mmdetection returns early
    # when no prior is left, so nothing gets matched then).
    gt_ok = gt_mask & (gt_max >= min_pos_iou) & (gt_max >= 0)
    gt_ids = jnp.arange(num_gts, dtype=jnp.int32)
    if gt_max_assign_all:
      is_best = (iou == gt_max[None, :]) & gt_ok[None, :]
      low_quality = jnp.max(jnp.where(is_best, gt_ids[None, :], -1), axis=1)
    else:
      best_anchor = iou.argmax(axis=0)  # first prior on ties, as torch.max
      target = jnp.where(gt_ok, best_anchor, num_anchors)  # out of range: dropped
      low_quality = jnp.full((num_anchors,), -1, jnp.int32).at[target].max(
          gt_ids, mode='drop')
    gt_index = jnp.where(low_quality >= 0, low_quality, gt_index)

  has_gt = jnp.any(gt_mask)
  gt_index = jnp.where(has_gt, gt_index, BACKGROUND)
  max_overlap = jnp.where(has_gt & valid, max_overlap, 0.)
  gt_index = jnp.where(valid, gt_index, IGNORED)
  labels = jnp.where(gt_index >= 0,
                     jnp.asarray(gt_labels, jnp.int32)[jnp.maximum(gt_index, 0)], -1)
  return Assignment(gt_index=gt_index, labels=labels, max_overlap=max_overlap)


def _iou_as_mmdet(anchors, gt_boxes, valid, gt_mask):
  """Pairwise IoU ``(A, G)`` as mmdetection's ``bbox_overlaps`` computes it in float32 (see
  `jaxdet.ops.boxes` for how it stays bit-exact on CPU); -1 for pairs with an invalid prior or a
  padded gt."""
  pair_ok = valid[:, None] & gt_mask[None, :]
  return jnp.where(pair_ok, box_iou(anchors, gt_boxes), -1.)


def _check_args(anchors, gt_boxes, gt_labels, gt_mask, valid, pos_iou_thr, neg_iou_thr,
                min_pos_iou):
  """Validates shapes and thresholds; returns the negative range ``(lo, hi)``."""
  check_inputs(anchors, gt_boxes, gt_labels, gt_mask, valid)
  for name, value in (('pos_iou_thr', pos_iou_thr), ('min_pos_iou', min_pos_iou)):
    if not isinstance(value, numbers.Real):
      raise ValueError(f'{name} must be a number, got {value!r}')
  if isinstance(neg_iou_thr, numbers.Real):
    return 0., float(neg_iou_thr)
  if (isinstance(neg_iou_thr, (tuple, list)) and len(neg_iou_thr) == 2
      and all(isinstance(v, numbers.Real) for v in neg_iou_thr)):
    return float(neg_iou_thr[0]), float(neg_iou_thr[1])
  raise ValueError(f'neg_iou_thr must be a number or a (lo, hi) pair, got {neg_iou_thr!r}')
