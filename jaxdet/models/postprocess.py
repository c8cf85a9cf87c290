"""Test-time post-processing of dense heads, mmdetection 3.3's order, inside `jit`, one image.

`BaseDenseHead._predict_by_feat_single` + `_bbox_post_process`:
  per level: scores (sigmoid) -> keep (prior, class) pairs with score > score_thr -> the top
  `nms_pre` of them; concatenate levels; decode the kept priors' regressions (clipped to the
  image's `img_shape`); map boxes to original-image pixels; multiply scores by the score factors
  (sigmoid centerness); drop boxes of width or height <= min_bbox_size; class-aware NMS;
  keep `max_per_img`.
Outputs have a fixed size `max_per_img` with a validity mask.
"""
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdet.ops.boxes import boxes_to_original
from jaxdet.ops.nms import batched_nms, filter_scores_and_topk


class Predictions(NamedTuple):
  """Detections of one image (vmapped: a leading batch axis), best first.

  boxes: (K, 4) float32 xyxy in original-image pixels; scores (K,); labels (K,) int32 (-1 in
  padding); valid (K,) bool.  K = test_cfg.max_per_img.
  """
  boxes: jax.Array
  scores: jax.Array
  labels: jax.Array
  valid: jax.Array


def flatten_levels(level_outputs: Sequence[jax.Array], width: int) -> jax.Array:
  """Per-level maps (B, H_l, W_l, P * width) -> (B, sum_l H_l W_l P, width), in the priors'
  order (level, y, x, prior)."""
  return jnp.concatenate([x.reshape(x.shape[0], -1, width) for x in level_outputs], axis=1)


def dense_predict(cls_logits: Sequence[jax.Array], box_regs: Sequence[jax.Array],
                  score_logits: Optional[Sequence[jax.Array]], priors: Sequence[jax.Array],
                  decode: Callable, meta: dict, *, score_thr: float, nms_pre: int,
                  iou_threshold: float, max_per_img: int, min_bbox_size: float = 0.):
  """One image's detections from its per-level head outputs.

  Args:
    cls_logits: per level (N_l, C) sigmoid class logits, priors in order.
    box_regs: per level (N_l, R) regressions (deltas, distances, ...).
    score_logits: per level (N_l,) centerness logits, or None.
    priors: per level (N_l, D) priors (anchors or points).
    decode: `decode(priors (K, D), regs (K, R), img_shape (2,)) -> (K, 4)` boxes in input pixels.
    meta: the image's `img_shape (2,)`, `scale_factor (2,)`, `flip ()`, `offset (2,)` (a batch row).
  """
  kept_priors, kept_regs, kept_scores, kept_labels, kept_valid, kept_factors = [], [], [], [], [], []
  for level, logits in enumerate(cls_logits):
    scores, labels, index, valid = filter_scores_and_topk(jax.nn.sigmoid(logits), score_thr,
                                                          nms_pre)
    kept_priors.append(priors[level][index])
    kept_regs.append(box_regs[level][index])
    kept_scores.append(scores)
    kept_labels.append(labels)
    kept_valid.append(valid)
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
                     valid=keep_valid)


def featmap_sizes_of(level_maps) -> tuple:
  """Static (h, w) of each level from per-level maps (B, H_l, W_l, C)."""
  return tuple((int(x.shape[1]), int(x.shape[2])) for x in level_maps)


def predict_batch(cls_out, reg_out, ctr_out, priors, decode, batch, test_cfg, *,
                  num_base_priors=1):
  """`dense_predict` vmapped over a batch of raw head outputs -> `Predictions` (B, K, ...).

  Args:
    cls_out, reg_out: tuples over levels of (B, H_l, W_l, num_base_priors * C) and
      (B, H_l, W_l, num_base_priors * R); ctr_out likewise with width 1, or None.
    priors: (P, D) all levels' priors in order (level, y, x, base prior).
    decode: see `dense_predict`.
    batch: img_shape, scale_factor, offset, flip (B, ...).
    test_cfg: score_thr, nms_pre, iou_threshold, max_per_img, min_bbox_size (optional).
  """
  sizes = featmap_sizes_of(cls_out)
  counts = [h * w * num_base_priors for h, w in sizes]
  splits = [int(s) for s in np.cumsum(counts)[:-1]]
  per_level = lambda x: None if x is None else tuple(jnp.split(x, splits, axis=0))
  num_classes = cls_out[0].shape[-1] // num_base_priors
  reg_width = reg_out[0].shape[-1] // num_base_priors
  level_priors = per_level(priors)

  def one_image(cls_logits, regs, ctr_logits, meta):
    return dense_predict(per_level(cls_logits), per_level(regs), per_level(ctr_logits),
                         level_priors, decode, meta, score_thr=test_cfg.score_thr,
                         nms_pre=test_cfg.nms_pre, iou_threshold=test_cfg.iou_threshold,
                         max_per_img=test_cfg.max_per_img,
                         min_bbox_size=test_cfg.get('min_bbox_size', 0.))

  meta = {k: batch[k] for k in ('img_shape', 'scale_factor', 'offset', 'flip')}
  ctr = None if ctr_out is None else flatten_levels(ctr_out, 1)[..., 0].astype(jnp.float32)
  return jax.vmap(one_image, in_axes=(0, 0, None if ctr is None else 0, 0))(
      flatten_levels(cls_out, num_classes).astype(jnp.float32),
      flatten_levels(reg_out, reg_width).astype(jnp.float32), ctr, meta)
