"""FCOS targets: mmdetection 3.3's ``FCOSHead.get_targets`` for one image.

A point is a candidate for a gt when

1. it lies strictly inside the gt (``min(l, t, r, b) > 0``), or, with ``center_sampling``,
   strictly inside the box of half-size ``stride * center_sample_radius`` around the gt's
   centre, clipped to the gt;
2. its largest regression distance ``max(l, t, r, b)`` lies in its level's regress range,
   bounds included (``lo <= d <= hi``).

A point with several candidate gts takes the one of smallest area (the first on equal areas,
as ``torch.min``); a point with none is background. Padded gts are never candidates.
"""
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdet.assigners.assignment import BACKGROUND, check_inputs

INF = 1e8  # mmdetection's fcos_head.INF: the "area" of a non-candidate and the open range end
FCOS_REGRESS_RANGES = ((-1, 64), (64, 128), (128, 256), (256, 512), (512, INF))


class FCOSTargets(NamedTuple):
  """Per-point FCOS targets of one image.

  gt_index:           (P,) int32. Assigned gt row, -1 background (FCOS ignores nothing).
  labels:             (P,) int32. Class of the assigned gt, -1 background (mmdetection uses
                      ``num_classes`` there).
  bbox_targets:       (P, 4) float32. (left, top, right, bottom) distances from the point to the
                      assigned gt's sides in input pixels, divided by the level's stride when
                      ``norm_on_bbox``; 0 for background (mmdetection leaves the distances to
                      an arbitrary gt there; they are never used).
  centerness_targets: (P,) float32. ``sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))``
                      (mmdetection's ``centerness_target``) for positives; 0 for background.
                      (On GPU within an ulp or two of torch's: XLA's division is not IEEE.)
  """
  gt_index: jax.Array
  labels: jax.Array
  bbox_targets: jax.Array
  centerness_targets: jax.Array


def fcos_assign(points, gt_boxes, gt_labels, gt_mask, *, num_level_points, strides,
                regress_ranges=FCOS_REGRESS_RANGES, center_sampling=False,
                center_sample_radius=1.5, norm_on_bbox=False):
  """FCOS classification / regression / centerness targets of one image.

  Args:
    points: (P, 2) float32 (x, y) point centres in input pixels, levels concatenated
      (mmdetection's ``MlvlPointGenerator`` with offset 0.5: ``((j + .5) * s, (i + .5) * s)``).
    gt_boxes: (G, 4) float32, xyxy, input pixels; rows where ``gt_mask`` is False are ignored.
    gt_labels: (G,) int32.
    gt_mask: (G,) bool, True for real gts.
    num_level_points: static ints, points per level (sum = P).
    strides: static numbers, one per level.
    regress_ranges: static (lo, hi) per level, in pixels.
    center_sampling: use the centre region instead of the whole gt (condition 1).
    center_sample_radius: half-size of the centre region in strides.
    norm_on_bbox: divide ``bbox_targets`` by the level's stride (as ``get_targets`` does).

  Returns:
    ``FCOSTargets``.
  """
  level_stride, level_lo, level_hi = _per_point_levels(
      points, gt_boxes, gt_labels, gt_mask, num_level_points, strides, regress_ranges)
  # stride * radius in double, then float32, as mmdetection fills its float32 tensor.
  level_radius = _repeat([s * center_sample_radius for s in strides], num_level_points)
  points = jnp.asarray(points, jnp.float32)
  gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
  xs, ys = points[:, 0, None], points[:, 1, None]  # (P, 1)
  x1, y1, x2, y2 = (gt_boxes[None, :, k] for k in range(4))  # (1, G)

  dist = jnp.stack([xs - x1, ys - y1, x2 - xs, y2 - ys], axis=-1)  # (P, G, 4) l, t, r, b
  if center_sampling:
    radius = jnp.asarray(level_radius)[:, None]
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    # The centre box, clipped to the gt (with mmdetection's comparisons).
    cx1 = jnp.where(cx - radius > x1, cx - radius, x1)
    cy1 = jnp.where(cy - radius > y1, cy - radius, y1)
    cx2 = jnp.where(cx + radius > x2, x2, cx + radius)
    cy2 = jnp.where(cy + radius > y2, y2, cy + radius)
    center_dist = jnp.stack([xs - cx1, ys - cy1, cx2 - xs, cy2 - ys], axis=-1)
    inside = center_dist.min(axis=-1) > 0
  else:
    inside = dist.min(axis=-1) > 0
  max_dist = dist.max(axis=-1)
  in_range = (max_dist >= level_lo[:, None]) & (max_dist <= level_hi[:, None])

  area = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])
  candidate = inside & in_range & jnp.asarray(gt_mask, bool)[None, :]
  area = jnp.where(candidate, area[None, :], INF)  # (P, G)
  gt_index = area.argmin(axis=1).astype(jnp.int32)  # first gt on equal areas, as torch.min
  positive = area.min(axis=1) != INF  # mmdetection's test, kept as is

  bbox_targets = jnp.take_along_axis(dist, gt_index[:, None, None], axis=1)[:, 0]
  bbox_targets = jnp.where(positive[:, None], bbox_targets, 0.)
  if norm_on_bbox:
    bbox_targets = bbox_targets / jnp.asarray(level_stride)[:, None]
  gt_index = jnp.where(positive, gt_index, BACKGROUND)
  labels = jnp.where(positive, jnp.asarray(gt_labels, jnp.int32)[jnp.maximum(gt_index, 0)], -1)
  return FCOSTargets(gt_index=gt_index, labels=labels, bbox_targets=bbox_targets,
                     centerness_targets=_centerness(bbox_targets, positive))


def _centerness(bbox_targets, positive):
  """mmdetection's ``FCOSHead.centerness_target``; 0 (not NaN) where ``positive`` is False."""
  left, top, right, bottom = (bbox_targets[:, k] for k in range(4))
  lr_max = jnp.where(positive, jnp.maximum(left, right), 1.)
  tb_max = jnp.where(positive, jnp.maximum(top, bottom), 1.)
  ratio = (jnp.minimum(left, right) / lr_max) * (jnp.minimum(top, bottom) / tb_max)
  return jnp.where(positive, jnp.sqrt(ratio), 0.)


def _per_point_levels(points, gt_boxes, gt_labels, gt_mask, num_level_points, strides,
                      regress_ranges):
  """Validates the arguments; returns per-point (stride, range lo, range hi) numpy float32."""
  check_inputs(points, gt_boxes, gt_labels, gt_mask, name='points', width=2)
  num_level_points = tuple(num_level_points)
  if not all(isinstance(n, numbers.Integral) and n >= 0 for n in num_level_points):
    raise ValueError(f'num_level_points must be non-negative ints, got {num_level_points}')
  if sum(num_level_points) != np.shape(points)[0]:
    raise ValueError(f'num_level_points {num_level_points} sum to {sum(num_level_points)}, '
                     f'but there are {np.shape(points)[0]} points')
  if len(strides) != len(num_level_points):
    raise ValueError(f'strides {tuple(strides)} must have one entry per level '
                     f'({len(num_level_points)} levels)')
  if len(regress_ranges) != len(num_level_points) or any(
      len(r) != 2 for r in regress_ranges):
    raise ValueError(f'regress_ranges {tuple(regress_ranges)} must hold one (lo, hi) per '
                     f'level ({len(num_level_points)} levels)')
  lo = _repeat([r[0] for r in regress_ranges], num_level_points)
  hi = _repeat([r[1] for r in regress_ranges], num_level_points)
  return _repeat(strides, num_level_points), lo, hi


def _repeat(level_values, num_level_points):
  """One float32 value per level -> (P,) numpy float32 (a trace-time constant)."""
  return np.repeat(np.asarray(level_values, np.float64).astype(np.float32),
                   tuple(num_level_points))
