"""Non-maximum suppression with static shapes: jit-able and vmap-able.

Semantics are mmdetection 3.3's (mmcv ``batched_nms`` + ``nms``):

* greedy in order of descending score; a box is dropped when its IoU with an already kept
  box **of the same label** is strictly greater than ``iou_threshold``;
* IoU is ``jaxdet.ops.boxes.box_iou`` (no "+1"; degenerate boxes have IoU 0 and never
  suppress anything);
* equal scores are visited in order of the lower input index first (mmcv's sort leaves
  this order unspecified; jaxdet fixes it so results are reproducible).

Class awareness uses a label-equality mask, not mmcv's coordinate-offset trick: the result
is the same except that the offset trick can round IoUs of far-offset boxes differently.

The sweep is a ``lax.while_loop`` that, per kept box, computes that box's IoU with all N
boxes (O(N) work and memory per step) and stops after ``max_output`` kept boxes or when
no candidate is left: O(N * max_output) instead of an N x N matrix. The first
``max_output`` boxes kept by full greedy NMS are exactly the ones this loop returns,
because a box's fate depends only on the boxes of higher score.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxdet.ops.boxes import box_iou


class NMSOutput(NamedTuple):
  """Result of ``batched_nms``; unpacks as ``index, valid = batched_nms(...)``."""
  index: jax.Array  # (max_output,) int32: kept input indices by descending score; -1 in padding
  valid: jax.Array  # (max_output,) bool: which slots hold a kept box


class Predictions(NamedTuple):
  """Detections of one image, ``K`` fixed slots, best first (vmapped: a leading batch axis).

  The one result type of every detector's ``predict`` and of ``multiclass_nms``; the user-facing
  per-image type is ``jaxdet.Detections`` (numpy, class names), made from it.
  """
  boxes: jax.Array   # (K, 4) float32 xyxy (predict: original-image pixels); zeros in invalid slots
  scores: jax.Array  # (K,) float32 (times the score factor when given); 0 in invalid slots
  labels: jax.Array  # (K,) int32 class index; -1 in invalid slots
  index: jax.Array   # (K,) int32 prior / query each detection came from (multiclass_nms: row of
                     # the input ``boxes``); -1 in invalid slots
  valid: jax.Array   # (K,) bool


def _canonical_zero(scores):
  # -0.0 and 0.0 must tie (jax's sorts order them by sign bit).
  return jnp.where(scores == 0, jnp.zeros_like(scores), scores)


def _check_count(value, name):
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")


def batched_nms(boxes, scores, labels, *, iou_threshold, max_output,
                score_threshold=-jnp.inf, valid=None):
  """Class-aware greedy NMS with a fixed-size output.

  Args:
    boxes: ``(N, 4)`` float32 xyxy.
    scores: ``(N,)`` float. Only boxes with ``score > score_threshold`` (and ``valid``)
      are candidates; NaN scores never are.
    labels: ``(N,)`` int class of each box; boxes of different labels never suppress each
      other (use all zeros for class-agnostic NMS).
    iou_threshold: suppress when IoU > iou_threshold (strictly, as mmcv).
    max_output: static int, the number of output slots (mmdetection's ``max_per_img``).
    score_threshold: float, candidates need a strictly greater score.
    valid: optional ``(N,)`` bool; False rows are ignored entirely (padding).

  Returns:
    ``NMSOutput(index (max_output,) int32, valid (max_output,) bool)``: indices into the
    inputs of the kept boxes sorted by descending score (ties: lower index first), padded
    with -1 / False. For a batch, ``jax.vmap`` this function.
  """
  boxes = jnp.asarray(boxes)
  scores = jnp.asarray(scores)
  labels = jnp.asarray(labels)
  _check_count(max_output, "max_output")
  if boxes.ndim != 2 or boxes.shape[-1] != 4:
    raise ValueError(f"boxes must have shape (N, 4), got {boxes.shape}")
  n = boxes.shape[0]
  if scores.shape != (n,) or labels.shape != (n,):
    raise ValueError(f"scores and labels must have shape ({n},), got {scores.shape} and "
                     f"{labels.shape}")
  if valid is not None and jnp.shape(valid) != (n,):
    raise ValueError(f"valid must have shape ({n},), got {jnp.shape(valid)}")
  empty = NMSOutput(jnp.full((max_output,), -1, jnp.int32), jnp.zeros((max_output,), bool))
  if n == 0:
    return empty

  scores = _canonical_zero(scores)
  candidate = scores > score_threshold
  if valid is not None:
    candidate = candidate & valid
  order = jnp.argsort(-scores, stable=True).astype(jnp.int32)  # NaN last; ties by index
  sorted_boxes = boxes[order]
  sorted_labels = labels[order]

  def cond(state):
    count, alive, _ = state
    return (count < max_output) & jnp.any(alive)

  def body(state):
    count, alive, keep = state
    i = jnp.argmax(alive)  # the best remaining candidate
    iou = box_iou(sorted_boxes[i][None], sorted_boxes)[0]
    suppressed = (iou > iou_threshold) & (sorted_labels == sorted_labels[i])
    alive = alive & ~suppressed
    alive = alive.at[i].set(False)
    keep = keep.at[count].set(order[i])
    return count + 1, alive, keep

  count, _, keep = lax.while_loop(cond, body, (jnp.int32(0), candidate[order], empty.index))
  return NMSOutput(keep, jnp.arange(max_output) < count)


def filter_scores_and_topk(scores, score_thr, topk):
  """mmdetection's ``filter_scores_and_topk`` with a fixed-size output.

  Keeps the (box, class) pairs with ``score > score_thr``, then the ``topk`` highest of
  them (the threshold is applied first, then top-k, as mmdetection 3.3).

  Args:
    scores: ``(N, C)`` per-class scores (sigmoid, or softmax without the background).
    score_thr: float threshold (strict).
    topk: static int, ``nms_pre``; ``<= 0`` or ``>= N * C`` keeps all ``N * C`` pairs.

  Returns:
    ``(scores (K,), labels (K,) int32, box_index (K,) int32, valid (K,) bool)`` with
    ``K = min(topk, N * C)``, sorted by descending score (ties: lower ``n * C + c`` first);
    invalid slots (fewer than K pairs above the threshold) come last.
  """
  scores = jnp.asarray(scores)
  if scores.ndim != 2:
    raise ValueError(f"scores must have shape (N, C), got {scores.shape}")
  if not isinstance(topk, int) or isinstance(topk, bool):
    raise ValueError(f"topk (nms_pre) must be an int, got {topk!r}")
  num_classes = scores.shape[1]
  flat = _canonical_zero(scores.reshape(-1))
  k = flat.shape[0] if topk <= 0 else min(topk, flat.shape[0])
  above = flat > score_thr
  top_scores, flat_index = lax.top_k(jnp.where(above, flat, -jnp.inf), k)
  flat_index = flat_index.astype(jnp.int32)
  valid = above[flat_index]
  box_index = flat_index // num_classes
  labels = flat_index % num_classes
  return jnp.where(valid, top_scores, 0), labels, box_index, valid


def multiclass_nms(boxes, scores, *, score_thr, nms_pre, iou_threshold, max_per_img,
                   score_factors=None, min_bbox_size=-1):
  """mmdetection's dense-head test-time pipeline on one image's (decoded) boxes.

  1. ``filter_scores_and_topk``: (box, class) pairs with score > ``score_thr``, then the
     ``nms_pre`` highest (threshold first, then top-k; mmdetection does this per FPN level,
     so call it per level and ``batched_nms`` the concatenation to reproduce that exactly).
  2. Multiply by ``score_factors[box]`` (FCOS/ATSS centerness) -- after the threshold.
  3. If ``min_bbox_size >= 0``, drop boxes with width or height ``<= min_bbox_size``.
  4. Class-aware ``batched_nms`` and the best ``max_per_img``. Equal final scores are visited
     in candidate order (higher class score first, then lower ``n * C + c``).

  Args:
    boxes: ``(N, 4)`` float32 xyxy, one box per prior shared by all classes.
    scores: ``(N, C)`` per-class scores.
    score_thr, nms_pre, iou_threshold, max_per_img: as mmdetection's ``test_cfg``
      (``nms_pre`` and ``max_per_img`` static ints; ``nms_pre <= 0`` keeps all).
    score_factors: optional ``(N,)`` per-box multiplier.
    min_bbox_size: mmdetection's ``min_bbox_size`` (-1 disables the filter).

  Returns:
    ``Predictions`` with ``max_per_img`` slots, best first, padded (see its fields).
  """
  boxes = jnp.asarray(boxes)
  scores = jnp.asarray(scores)
  if boxes.ndim != 2 or boxes.shape[-1] != 4:
    raise ValueError(f"boxes must have shape (N, 4), got {boxes.shape}")
  if scores.ndim != 2 or scores.shape[0] != boxes.shape[0]:
    raise ValueError(f"scores must have shape ({boxes.shape[0]}, C), got {scores.shape}")
  _check_count(max_per_img, "max_per_img")
  cand_scores, labels, box_index, valid = filter_scores_and_topk(scores, score_thr, nms_pre)
  if score_factors is not None:
    score_factors = jnp.asarray(score_factors)
    if score_factors.shape != (boxes.shape[0],):
      raise ValueError(f"score_factors must have shape ({boxes.shape[0]},), got "
                       f"{score_factors.shape}")
    cand_scores = cand_scores * score_factors[box_index]
  cand_boxes = boxes[box_index]
  if min_bbox_size >= 0:
    wh = cand_boxes[:, 2:] - cand_boxes[:, :2]
    valid = valid & jnp.all(wh > min_bbox_size, axis=-1)
  keep, keep_valid = batched_nms(cand_boxes, cand_scores, labels, iou_threshold=iou_threshold,
                                 max_output=max_per_img, valid=valid)
  return Predictions(
      boxes=jnp.where(keep_valid[:, None], cand_boxes[keep], 0),
      scores=jnp.where(keep_valid, cand_scores[keep], 0),
      labels=jnp.where(keep_valid, labels[keep], -1),
      index=jnp.where(keep_valid, box_index[keep], -1),
      valid=keep_valid)
