"""Box geometry in pure jnp.

Convention everywhere in jaxdet: a box is ``(x1, y1, x2, y2)`` float32 in pixels of the
network input; ``x2 - x1`` is the width (no "+1" as in old Detectron).  All functions
broadcast over leading dimensions and are safe for degenerate boxes: a zero-area box has
IoU 0 with everything (never NaN) and gives finite gradients.

The arithmetic follows mmdetection's ``bbox_overlaps`` step by step (same operation
order, same ``eps`` guard on the union) so that IoU values, and therefore assignments that
depend on ties, agree bit for bit with mmdetection on the same float32 inputs (on CPU; XLA's
GPU division is not correctly rounded, so there an IoU can be an ulp or two off).  XLA may
contract a product and the add that consumes it into one fused multiply-add, which rounds once
where torch rounds twice (~1% of real-valued pairs came out an ulp off): every area and overlap
product therefore passes through ``rounded``, a select that no multiply-add is fused across.
"""
import jax.numpy as jnp
import numpy as np

EPS = 1e-6  # mmdetection's default eps for bbox_overlaps


def rounded(x):
  """``x``, materialised as a rounded float32 value so that XLA cannot fuse the product that
  made it into an FMA with a later add (the ``x == x`` select is opaque to contraction; NaN
  stays NaN, gradients pass through)."""
  return jnp.where(x == x, x, jnp.nan)


def box_area(boxes):
  """Area of ``boxes (..., 4)`` -> ``(...)``; negative extents give negative area as in mmdet."""
  return rounded((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]))


def _pairwise_inter(boxes1, boxes2):
  lt = jnp.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
  rb = jnp.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
  wh = jnp.clip(rb - lt, 0)
  return rounded(wh[..., 0] * wh[..., 1])


def box_iou(boxes1, boxes2, *, eps=EPS):
  """Pairwise IoU. ``boxes1 (..., M, 4)``, ``boxes2 (..., N, 4)`` -> ``(..., M, N)``."""
  area1 = box_area(boxes1)
  area2 = box_area(boxes2)
  overlap = _pairwise_inter(boxes1, boxes2)
  union = area1[..., :, None] + area2[..., None, :] - overlap
  union = jnp.maximum(union, eps)
  return overlap / union


def box_iof(boxes1, boxes2, *, eps=EPS):
  """Pairwise intersection over the *foreground* (``boxes1``) area: ``(..., M, N)``.

  mmdetection's ``mode='iof'``: used to find anchors that mostly lie inside ignore regions.
  """
  area1 = box_area(boxes1)
  overlap = _pairwise_inter(boxes1, boxes2)
  return overlap / jnp.maximum(area1[..., :, None], eps)


def box_iou_aligned(boxes1, boxes2, *, eps=EPS):
  """Element-wise IoU of ``boxes1 (..., 4)`` and ``boxes2 (..., 4)`` -> ``(...)``."""
  iou, _, _ = _aligned_iou_union(boxes1, boxes2, eps)
  return iou


def _aligned_iou_union(boxes1, boxes2, eps):
  area1 = box_area(boxes1)
  area2 = box_area(boxes2)
  lt = jnp.maximum(boxes1[..., :2], boxes2[..., :2])
  rb = jnp.minimum(boxes1[..., 2:], boxes2[..., 2:])
  wh = jnp.clip(rb - lt, 0)
  overlap = rounded(wh[..., 0] * wh[..., 1])
  union = jnp.maximum(area1 + area2 - overlap, eps)
  return overlap / union, union, overlap


def _enclose_area(lt, rb, eps):
  wh = jnp.clip(rb - lt, 0)
  return jnp.maximum(wh[..., 0] * wh[..., 1], eps)


def generalized_box_iou(boxes1, boxes2, *, eps=EPS):
  """Pairwise GIoU (Rezatofighi et al. 2019): ``(..., M, 4), (..., N, 4) -> (..., M, N)``.

  Values lie in (-1, 1]; degenerate boxes give finite values.
  """
  area1 = box_area(boxes1)
  area2 = box_area(boxes2)
  overlap = _pairwise_inter(boxes1, boxes2)
  union = jnp.maximum(area1[..., :, None] + area2[..., None, :] - overlap, eps)
  iou = overlap / union
  enclose = _enclose_area(
      jnp.minimum(boxes1[..., :, None, :2], boxes2[..., None, :, :2]),
      jnp.maximum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:]), eps)
  return iou - (enclose - union) / enclose


def generalized_box_iou_aligned(boxes1, boxes2, *, eps=EPS):
  """Element-wise GIoU of ``boxes1 (..., 4)`` and ``boxes2 (..., 4)`` -> ``(...)``."""
  iou, union, _ = _aligned_iou_union(boxes1, boxes2, eps)
  enclose = _enclose_area(jnp.minimum(boxes1[..., :2], boxes2[..., :2]),
                          jnp.maximum(boxes1[..., 2:], boxes2[..., 2:]), eps)
  return iou - (enclose - union) / enclose


def clip_boxes(boxes, img_shape):
  """Clip ``boxes (..., 4)`` to an image of ``img_shape = (height, width)`` (scalars or arrays
  broadcastable to ``boxes[..., 0]``): x to [0, width], y to [0, height]."""
  h = jnp.asarray(img_shape[0], boxes.dtype)
  w = jnp.asarray(img_shape[1], boxes.dtype)
  x1 = jnp.clip(boxes[..., 0], 0, w)
  y1 = jnp.clip(boxes[..., 1], 0, h)
  x2 = jnp.clip(boxes[..., 2], 0, w)
  y2 = jnp.clip(boxes[..., 3], 0, h)
  return jnp.stack([x1, y1, x2, y2], axis=-1)


def box_xyxy_to_cxcywh(boxes):
  """``(x1, y1, x2, y2) -> (cx, cy, w, h)``, shape ``(..., 4)``."""
  x1, y1, x2, y2 = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([(x1 + x2) * 0.5, (y1 + y2) * 0.5, x2 - x1, y2 - y1], axis=-1)


def box_cxcywh_to_xyxy(boxes):
  """``(cx, cy, w, h) -> (x1, y1, x2, y2)``, shape ``(..., 4)``."""
  cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def boxes_to_original(boxes, meta, *, clip=False):
  """Map boxes from network-input pixels back to the original image (inverse of flip + scale).

  Args:
    boxes: (..., N, 4) xyxy in input pixels (numpy or jax array).
    meta: mapping with ``scale_factor (..., 2)``, ``offset (..., 2)`` (optional, default 0),
      ``flip (...,)`` bool and ``img_shape (..., 2)`` (h, w), as in `sample_meta` or a batch;
      leading dims broadcast against the boxes' (so it vmaps over images).
    clip: also clip to ``orig_size (..., 2)`` from ``meta``.
  Returns:
    (..., N, 4) xyxy in original-image pixels; jnp if any input is a jax array, else numpy.
  """
  xp = np
  if any(type(v).__module__.startswith("jax") for v in (boxes, *meta.values())):
    xp = jnp
  boxes = xp.asarray(boxes, xp.float32)
  sf = xp.asarray(meta["scale_factor"], xp.float32)[..., None, :]
  off = xp.asarray(meta.get("offset", xp.zeros_like(sf[..., 0, :])), xp.float32)[..., None, :]
  flip = xp.asarray(meta["flip"], bool)[..., None]
  img_w = xp.asarray(meta["img_shape"], xp.float32)[..., None, 1]
  x1 = xp.where(flip, img_w - boxes[..., 2], boxes[..., 0])
  x2 = xp.where(flip, img_w - boxes[..., 0], boxes[..., 2])
  x1 = (x1 - off[..., 0]) / sf[..., 0]
  x2 = (x2 - off[..., 0]) / sf[..., 0]
  y1 = (boxes[..., 1] - off[..., 1]) / sf[..., 1]
  y2 = (boxes[..., 3] - off[..., 1]) / sf[..., 1]
  out = xp.stack([x1, y1, x2, y2], axis=-1)
  if clip:
    hw = xp.asarray(meta["orig_size"], xp.float32)[..., None, :]
    hi = xp.stack([hw[..., 1], hw[..., 0], hw[..., 1], hw[..., 0]], axis=-1)
    out = xp.clip(out, 0, hi)
  return out
