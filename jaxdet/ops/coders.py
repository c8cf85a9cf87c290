"""Box coders: how a head's regression output relates to boxes.

Two codings, as pure functions that broadcast over leading dimensions (float32):

* ``delta_encode`` / ``delta_decode`` -- mmdetection 3.3's ``DeltaXYWHBBoxCoder``
  (``bbox2delta`` / ``delta2bbox``) used by RetinaNet, ATSS and SSD. A box is coded
  relative to a prior (anchor) box ``p`` as::

      dx = (gx - px) / pw     dy = (gy - py) / ph     dw = log(gw / pw)     dh = log(gh / ph)

  then normalised ``(d - means) / stds``. Centres ``(x1 + x2) * 0.5``, sizes ``x2 - x1``.
  The arithmetic follows mmdetection operation by operation, so float32 results agree.
* ``distance_encode`` / ``distance_decode`` -- FCOS's ``(left, top, right, bottom)``
  distances from a point to the box sides (mmdetection's ``bbox2distance`` /
  ``distance2bbox``), optionally in units of the level's stride (FCOS ``norm_on_bbox``).

``decode(prior, encode(prior, box)) == box`` and ``encode(prior, decode(prior, d)) == d``
up to float rounding, as long as no clamp (``wh_ratio_clip``, ``max_shape``,
``max_dis``) is active.
"""
import math

import jax.numpy as jnp
from jax import lax

from jaxdet.ops.boxes import clip_boxes


def _as_f32(x, name, last):
  x = jnp.asarray(x, jnp.float32)
  if x.ndim == 0 or x.shape[-1] != last:
    raise ValueError(f"{name} must have shape (..., {last}), got {x.shape}")
  return x


def _four(values, name):
  values = tuple(float(v) for v in values)
  if len(values) != 4:
    raise ValueError(f"{name} must hold 4 numbers (x, y, w, h), got {values}")
  return jnp.asarray(values, jnp.float32)


def _true_divide(x, y):
  """``x / y`` rounded as IEEE division. XLA rewrites a division by a broadcast operand into a
  multiplication by its reciprocal (up to 1 ulp off mmdetection's targets); materialising
  the broadcast behind an optimization barrier keeps the true division."""
  y = jnp.broadcast_to(y, jnp.broadcast_shapes(jnp.shape(x), jnp.shape(y)))
  return x / lax.optimization_barrier(y)


def delta_encode(proposals, gt, *, means=(0., 0., 0., 0.), stds=(1., 1., 1., 1.)):
  """Deltas that move ``proposals`` onto ``gt`` (mmdetection's ``bbox2delta``).

  Args:
    proposals: ``(..., 4)`` prior boxes (anchors), xyxy pixels.
    gt: ``(..., 4)`` target boxes, xyxy pixels; broadcast against ``proposals``.
    means, stds: 4 numbers each; the deltas are returned as ``(d - means) / stds``.

  Returns:
    ``(..., 4)`` float32 ``(dx, dy, dw, dh)``. A zero-size proposal or gt gives inf/nan,
    as in mmdetection (callers encode only positive priors against real boxes).
  """
  proposals = _as_f32(proposals, "proposals", 4)
  gt = _as_f32(gt, "gt", 4)
  means = _four(means, "means")
  stds = _four(stds, "stds")
  px = (proposals[..., 0] + proposals[..., 2]) * 0.5
  py = (proposals[..., 1] + proposals[..., 3]) * 0.5
  pw = proposals[..., 2] - proposals[..., 0]
  ph = proposals[..., 3] - proposals[..., 1]
  gx = (gt[..., 0] + gt[..., 2]) * 0.5
  gy = (gt[..., 1] + gt[..., 3]) * 0.5
  gw = gt[..., 2] - gt[..., 0]
  gh = gt[..., 3] - gt[..., 1]
  deltas = jnp.stack([(gx - px) / pw, (gy - py) / ph, jnp.log(gw / pw), jnp.log(gh / ph)],
                     axis=-1)
  return _true_divide(deltas - means, stds)


def delta_decode(rois, deltas, *, means=(0., 0., 0., 0.), stds=(1., 1., 1., 1.),
                 max_shape=None, wh_ratio_clip=16 / 1000, clip_border=True,
                 add_ctr_clamp=False, ctr_clamp=32):
  """Apply ``deltas`` to ``rois`` (mmdetection's ``delta2bbox``).

  Args:
    rois: ``(..., 4)`` prior boxes, xyxy pixels.
    deltas: ``(..., 4)`` normalised deltas ``(dx, dy, dw, dh)``; broadcast against ``rois``
      (for per-class deltas reshape ``(N, C * 4)`` to ``(N, C, 4)`` and use ``rois[:, None]``).
    means, stds: the normalisation of ``delta_encode``; deltas are first mapped back to
      ``d * stds + means``.
    max_shape: ``(height, width)`` of the image (numbers, or arrays broadcastable to
      ``rois[..., 0]``), or None. When given and ``clip_border``, x is clipped to
      ``[0, width]`` and y to ``[0, height]``.
    wh_ratio_clip: ``dw, dh`` are clamped to ``+-|log(wh_ratio_clip)|`` (4.135 for the
      default 16/1000), so a box grows or shrinks by at most ~62.5x per side.
    add_ctr_clamp, ctr_clamp: YOLOF's variant: the centre shift ``(dx * pw, dy * ph)`` is
      clamped to ``+-ctr_clamp`` pixels and ``dw, dh`` only from above.

  Returns:
    ``(..., 4)`` float32 boxes, xyxy pixels.
  """
  rois = _as_f32(rois, "rois", 4)
  deltas = _as_f32(deltas, "deltas", 4)
  if not wh_ratio_clip > 0:
    raise ValueError(f"wh_ratio_clip must be > 0, got {wh_ratio_clip}")
  denorm = deltas * _four(stds, "stds") + _four(means, "means")
  dxy = denorm[..., :2]
  dwh = denorm[..., 2:]
  pxy = (rois[..., :2] + rois[..., 2:]) * 0.5
  pwh = rois[..., 2:] - rois[..., :2]
  dxy_wh = pwh * dxy
  max_ratio = abs(math.log(wh_ratio_clip))
  if add_ctr_clamp:
    dxy_wh = jnp.clip(dxy_wh, -ctr_clamp, ctr_clamp)
    dwh = jnp.minimum(dwh, max_ratio)
  else:
    dwh = jnp.clip(dwh, -max_ratio, max_ratio)
  gxy = pxy + dxy_wh
  gwh = pwh * jnp.exp(dwh)
  boxes = jnp.concatenate([gxy - gwh * 0.5, gxy + gwh * 0.5], axis=-1)
  if clip_border and max_shape is not None:
    boxes = clip_boxes(boxes, max_shape)
  return boxes


def _stride(stride, name="stride"):
  if isinstance(stride, (int, float)) and not stride > 0:
    raise ValueError(f"{name} must be > 0, got {stride}")
  return jnp.asarray(stride, jnp.float32)


def distance_encode(points, gt, *, max_dis=None, eps=0.1, stride=None):
  """Distances ``(left, top, right, bottom)`` from ``points`` to the sides of ``gt``.

  mmdetection's ``bbox2distance`` plus FCOS's ``norm_on_bbox``.

  Args:
    points: ``(..., 2)`` point coordinates ``(x, y)``, pixels.
    gt: ``(..., 4)`` boxes, xyxy pixels; broadcast against ``points``.
    max_dis: if given, each distance is clamped to ``[0, max_dis - eps]`` (GFL style),
      in the units of the result (after the division by ``stride``).
    stride: if given (a number or an array broadcastable to ``points[..., 0]``), the
      distances are divided by it (FCOS ``norm_on_bbox=True``).

  Returns:
    ``(..., 4)`` float32 distances; negative when the point lies outside ``gt``.
  """
  points = _as_f32(points, "points", 2)
  gt = _as_f32(gt, "gt", 4)
  dist = jnp.stack([points[..., 0] - gt[..., 0], points[..., 1] - gt[..., 1],
                    gt[..., 2] - points[..., 0], gt[..., 3] - points[..., 1]], axis=-1)
  if stride is not None:
    dist = _true_divide(dist, _stride(stride)[..., None])
  if max_dis is not None:
    dist = jnp.clip(dist, 0, max_dis - eps)
  return dist


def distance_decode(points, distance, *, max_shape=None, stride=None):
  """Boxes from ``points`` and ``(left, top, right, bottom)`` distances (``distance2bbox``).

  Args:
    points: ``(..., 2)`` ``(x, y)`` pixels.
    distance: ``(..., 4)``; broadcast against ``points``.
    max_shape: ``(height, width)`` to clip to (numbers or arrays broadcastable to
      ``points[..., 0]``), or None.
    stride: if given, ``distance`` is in stride units and is multiplied by it first
      (FCOS ``norm_on_bbox`` at test time).

  Returns:
    ``(..., 4)`` float32 boxes, xyxy pixels.
  """
  points = _as_f32(points, "points", 2)
  distance = _as_f32(distance, "distance", 4)
  if stride is not None:
    distance = distance * _stride(stride)[..., None]
  boxes = jnp.stack([points[..., 0] - distance[..., 0], points[..., 1] - distance[..., 1],
                     points[..., 0] + distance[..., 2], points[..., 1] + distance[..., 3]],
                    axis=-1)
  if max_shape is not None:
    boxes = clip_boxes(boxes, max_shape)
  return boxes
