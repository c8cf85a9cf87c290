"""Test-time post-processing of dense heads, mmdetection 3.3's order, inside `jit`, one image.

`BaseDenseHead._predict_by_feat_single` + `_bbox_post_process`:
  per level: scores (sigmoid; or softmax with the last column, background, dropped: SSD) ->
  keep (prior, class) pairs with score > score_thr -> the top `nms_pre` of them; concatenate
  levels; decode the kept priors' regressions (clipped to the image's `img_shape`); map boxes to
  original-image pixels; multiply scores by the score factors (sigmoid centerness); drop boxes of
  width or height <= min_bbox_size; class-aware NMS; keep `max_per_img`.
Outputs have a fixed size `max_per_img` with a validity mask (`jaxdet.ops.nms.Predictions`).
"""
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdet.models.heads.levels import featmap_sizes_of, flatten_levels
from jaxdet.ops.boxes import boxes_to_original
from jaxdet.ops.nms import Predictions, batched_nms, filter_scores_and_topk

SCORES = ('sigmoid', 'softmax')


def class_scores(logits, score='sigmoid'):
  """(N, C) sigmoid scores, or (N, C) softmax scores of (N, C + 1) logits whose last column is
  the background (mmdetection's `use_sigmoid_cls=False` heads: SSD)."""
  if score == 'sigmoid':
    return jax.nn.sigmoid(logits)
  if score == 'softmax':
    return jax.nn.softmax(logits, axis=-1)[..., :-1]
  raise ValueError(f'score={score!r} must be one of {SCORES}')


def dense_predict(cls_logits: Sequence[jax.Array], box_regs: Sequence[jax.Array],
                  score_logits: Optional[Sequence[jax.Array]], priors: Sequence[jax.Array],
                  decode: Callable, meta: dict, *, score_thr: float, nms_pre: int,
                  iou_threshold: float, max_per_img: int, min_bbox_size: float = 0.,
                  score: str = 'sigmoid'):
  """One image's detections from its per-level head outputs.

  Args:
    cls_logits: per level (N_l, C) class logits ((N_l, C + 1) for softmax), priors in order.
    box_regs: per level (N_l, R) regressions (deltas, distances, ...).
    score_logits: per level (N_l,) centerness logits, or None.
    priors: per level (N_l, D) priors (anchors or points).
    decode: `decode(priors (K, D), regs (K, R), img_shape (2,)) -> (K, 4)` boxes in input pixels.
    meta: the image's `img_shape (2,)`, `scale_factor (2,)`, `flip ()`, `offset (2,)` (a batch row).
    score: 'sigmoid' or 'softmax' (see `class_scores`).
  Returns:
    `Predictions` with `max_per_img` slots; `index` is the prior's position in all levels' order.
  """
  kept_priors, kept_regs, kept_scores, kept_labels, kept_valid, kept_factors = [], [], [], [], [], []
  kept_index, offset = [], 0
  for level, logits in enumerate(cls_logits):
    scores, labels, index, valid = filter_scores_and_topk(class_scores(logits, score), score_thr,
                                                          nms_pre)
    kept_priors.append(priors[level][index])
    kept_regs.append(box_regs[level][index])
    kept_scores.append(scores)
    kept_labels.append(labels)
    kept_valid.append(valid)
    kept_index.append(index + offset)
    offset += logits.shape[0]
    if score_logits is not None:
      kept_factors.append(jax.nn.sigmoid(score_logits[level][index]))
  boxes = decode(jnp.concatenate(kept_priors), jnp.concatenate(kept_regs), meta['img_shape'])
  boxes = boxes_to_original(boxes, {k: meta[k] for k in ('scale_factor', 'offset', 'flip',
                                                         'img_shape')})
  scores = jnp.concatenate(kept_scores)
  if score_logits is not None:
    scores = scores * jnp.concatenate(kept_factors)
  labels = jnp.concatenate(kept_labels)
  valid = jnp.concatenate(kept_valid)
  if min_bbox_size >= 0:
    wh = boxes[:, 2:] - boxes[:, :2]
    valid = valid & jnp.all(wh > min_bbox_size, axis=-1)
  keep, keep_valid = batched_nms(boxes, scores, labels, iou_threshold=iou_threshold,
                                 max_output=max_per_img, valid=valid)
  return Predictions(boxes=jnp.where(keep_valid[:, None], boxes[keep], 0.),
                     scores=jnp.where(keep_valid, scores[keep], 0.),
                     labels=jnp.where(keep_valid, labels[keep], -1),
                     index=jnp.where(keep_valid, jnp.concatenate(kept_index)[keep], -1),
                     valid=keep_valid)


def predict_batch(cls_out, reg_out, ctr_out, priors, decode, batch, test_cfg, *,
                  num_base_priors=1, level_counts=None, score='sigmoid'):
  """`dense_predict` vmapped over a batch of raw head outputs -> `Predictions` (B, K, ...).

  Args:
    cls_out, reg_out: tuples over levels of (B, H_l, W_l, P_l * C) and (B, H_l, W_l, P_l * R),
      P_l base priors per location; ctr_out likewise with width 1, or None.
    priors: (P, D) all levels' priors in order (level, y, x, base prior).
    decode: see `dense_predict`.
    batch: img_shape, scale_factor, offset, flip (B, ...).
    test_cfg: score_thr, nms_pre, iou_threshold, max_per_img, min_bbox_size (optional).
    num_base_priors: P_l for every level, or
    level_counts: priors per level, sum_l H_l W_l P_l (`jaxdet.priors.level_counts`; SSD's
      levels have 4 or 6 anchors per location); default H_l W_l num_base_priors.
    score: 'sigmoid' or 'softmax' (C + 1 logits per prior, background last).
  """
  sizes = featmap_sizes_of(cls_out)
  counts = (list(level_counts) if level_counts is not None
            else [h * w * num_base_priors for h, w in sizes])
  if len(counts) != len(sizes) or any(c % (h * w) for c, (h, w) in zip(counts, sizes)):
    raise ValueError(f'level_counts {counts} do not fit the feature maps {sizes}')
  splits = [int(s) for s in np.cumsum(counts)[:-1]]
  per_level = lambda x: None if x is None else tuple(jnp.split(x, splits, axis=0))
  per_location = [c // (h * w) for c, (h, w) in zip(counts, sizes)]
  num_classes = cls_out[0].shape[-1] // per_location[0]
  reg_width = reg_out[0].shape[-1] // per_location[0]
  level_priors = per_level(priors)

  def one_image(cls_logits, regs, ctr_logits, meta):
    return dense_predict(per_level(cls_logits), per_level(regs), per_level(ctr_logits),
                         level_priors, decode, meta, score_thr=test_cfg.score_thr,
                         nms_pre=test_cfg.nms_pre, iou_threshold=test_cfg.iou_threshold,
                         max_per_img=test_cfg.max_per_img,
                         min_bbox_size=test_cfg.get('min_bbox_size', 0.), score=score)

  meta = {k: batch[k] for k in ('img_shape', 'scale_factor', 'offset', 'flip')}
  ctr = None if ctr_out is None else flatten_levels(ctr_out, 1)[..., 0].astype(jnp.float32)
  return jax.vmap(one_image, in_axes=(0, 0, None if ctr is None else 0, 0))(
      flatten_levels(cls_out, num_classes).astype(jnp.float32),
      flatten_levels(reg_out, reg_width).astype(jnp.float32), ctr, meta)
