"""ATSS assigner: mmdetection 3.3's ``ATSSAssigner.assign`` for one image (Zhang et al. 2020).

mmdetection's rules:

1. candidates: for each gt and each pyramid level, the ``min(topk, anchors in the level)``
   anchors whose centres are nearest to the gt's centre (Euclidean distance, float32
   ``sqrt(dx**2 + dy**2)``);
2. the gt's IoU threshold is ``mean + std`` of its candidates' IoUs (torch's unbiased std);
3. a candidate is positive if its IoU >= the threshold and its centre lies inside the gt
   (``min(l, t, r, b) > 0.01`` px);
4. an anchor positive for several gts takes the gt of highest IoU (the lowest gt index on
   equal IoUs, as ``torch.max``); ``max_overlap`` is that IoU, ``-1e8`` for anchors that are
   positive for no gt, 0 for every anchor of an image without gts (mmdetection's values).

Padded gts (``gt_mask`` False, their rows may hold any garbage) are never candidates.  Invalid
anchors (``valid`` False) are removed first, as mmdetection's ``ATSSHead`` does before calling
the assigner, so step 1 counts only valid anchors of each level; they come out ignored (-2)
with ``max_overlap`` 0.

Distance ties at the k-th place, which ``torch.topk`` breaks arbitrarily, are broken here by
the smaller squared vertical offset ``dy**2``, then the upper centre, the smaller ``dx**2``,
the left centre, the lower anchor index.  That order is what lets two ways of finding the
candidates select the same anchors, bit for bit:

* dense (``atss_assign_dense``, for priors not on grids): distances of every anchor to every
  gt (A x G) and a per-level selection -- simple but slow on a CPU (~0.5 s per image at 20k
  anchors x 128 gts on 2 cores);
* grid (``atss_assign``, from ``featmap_sizes``; ~1 ms per image there): only a few cells
  of each level can be among the ``topk`` nearest; see ``atss_grid.py`` for why, and for what
  it assumes of the anchors (mmdetection's ``AnchorGenerator`` grids and valid flags).

Every product is rounded to float32 before it is summed (XLA would otherwise fuse it into an
FMA), so distances and IoUs are those of mmdetection's float32 torch code bit for bit.  Its
``std`` accumulates in double; here it is float32, which can move the threshold by an ulp.
Not supported: ``gt_bboxes_ignore`` and DDOD's cost-based ``alpha`` variant.
"""
import numbers
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jaxdet.assigners.assignment import BACKGROUND, IGNORED, Assignment, check_inputs
from jaxdet.assigners.atss_grid import grid_candidates, materialize, squared
from jaxdet.ops.boxes import box_iou_aligned

INF = 100000000.  # mmdetection's ATSSAssigner INF: max_overlap of unassigned anchors is -INF
CENTER_EPS = 0.01  # an anchor centre must be more than this inside each side of the gt


def atss_assign(anchors, gt_boxes, gt_labels, gt_mask, featmap_sizes=None, *, topk=9,
                valid=None, num_level_anchors=None):
  """Assigns each anchor to a gt or background, exactly as mmdetection's ATSSAssigner.

  The anchors must be the regular grids of mmdetection's ``AnchorGenerator`` (or
  ``jaxdet.priors.anchor_grid``), level by level, ordered row, column, base anchor; the
  candidates are then found on each level's grid (~1 ms per image on a CPU at 20k anchors x
  128 gts; see atss_grid.py).  For priors that are not on grids use
  ``atss_assign_dense`` (the same assignment from all anchor-gt distances, hundreds of times
  slower on a CPU).

  Args:
    anchors: (A, 4) float32, xyxy, input pixels; levels concatenated.
    gt_boxes: (G, 4) float32, xyxy, input pixels; rows where ``gt_mask`` is False are ignored.
    gt_labels: (G,) int32 class of each gt.
    gt_mask: (G,) bool, True for real gts.
    featmap_sizes: static ``((h, w), ...)``, the grid of each level.  Level ``l`` holds
      ``h * w * n`` anchors, ``n = A / sum(h * w)`` anchors per location (the same on every
      level, as mmdetection's AnchorGenerator) unless ``num_level_anchors`` says otherwise.
    topk: candidates per level and gt (ATSS: 9).
    valid: optional (A,) bool, mmdetection's valid flags (anchors on the image's own padded
      area); invalid anchors are never candidates and come out ignored.
    num_level_anchors: optional static ints, anchors per level (sum = A); checked against
      ``featmap_sizes``.  Given without ``featmap_sizes`` (the call of earlier versions), the
      dense path runs, with a warning: call ``atss_assign_dense`` for that.

  Returns:
    ``Assignment`` with (A,) ``gt_index`` (>= 0 gt row, -1 background, -2 invalid anchor),
    ``labels`` (class of the assigned gt, else -1) and ``max_overlap`` (IoU with the assigned
    gt; -1e8 for background when the image has gts, 0 when it has none, 0 for invalid anchors).
  """
  if featmap_sizes is None:
    if num_level_anchors is None:
      raise ValueError('atss_assign needs featmap_sizes ((h, w) of each level of the anchor '
                       'grid); for priors not on grids use atss_assign_dense')
    warnings.warn('atss_assign without featmap_sizes takes the dense path (hundreds of times '
                  'slower on a CPU): pass featmap_sizes for anchors on grids, or call '
                  'atss_assign_dense for priors that are not', stacklevel=2)
    return atss_assign_dense(anchors, gt_boxes, gt_labels, gt_mask, num_level_anchors,
                             topk=topk, valid=valid)
  levels = _check_args(anchors, gt_boxes, gt_labels, gt_mask, valid, num_level_anchors, topk,
                       featmap_sizes)
  return _assign(anchors, gt_boxes, gt_labels, gt_mask, valid, levels, topk, grid_candidates)


def atss_assign_dense(anchors, gt_boxes, gt_labels, gt_mask, num_level_anchors, *, topk=9,
                      valid=None):
  """``atss_assign`` for priors in any layout (not necessarily on grids), from the distances of
  every anchor to every gt: A x G work and a per-level selection, ~0.5 s per image at 20k
  anchors x 128 gts on a 2-core CPU (use ``atss_assign`` with ``featmap_sizes`` for grids: the
  same result bit for bit, hundreds of times faster).

  ``num_level_anchors``: static ints, anchors per level (sum = A), as in the anchors' order.
  The other arguments and the result are ``atss_assign``'s.
  """
  levels = _check_args(anchors, gt_boxes, gt_labels, gt_mask, valid, num_level_anchors, topk,
                       None)
  return _assign(anchors, gt_boxes, gt_labels, gt_mask, valid, levels, topk, _dense_candidates)


def _assign(anchors, gt_boxes, gt_labels, gt_mask, valid, levels, topk, find_candidates):
  num_anchors, num_gts = np.shape(anchors)[0], np.shape(gt_boxes)[0]
  anchors = jnp.asarray(anchors, jnp.float32)
  gt_mask = jnp.asarray(gt_mask, bool)
  # Padding rows may hold NaN or inf: give them a harmless box before any arithmetic.
  gt_boxes = jnp.where(gt_mask[:, None], jnp.asarray(gt_boxes, jnp.float32), 0.)
  valid = jnp.ones((num_anchors,), bool) if valid is None else jnp.asarray(valid, bool)
  if num_gts == 0 or num_anchors == 0:
    return _no_gt(valid)

  gt_cx = (gt_boxes[:, 0] + gt_boxes[:, 2]) / 2.
  gt_cy = (gt_boxes[:, 1] + gt_boxes[:, 3]) / 2.
  cand, selected = find_candidates(anchors, valid, gt_cx, gt_cy, levels, topk)
  return _assign_candidates(anchors, gt_boxes, gt_labels, gt_mask, valid, cand, selected)


def _dense_candidates(anchors, valid, gt_cx, gt_cy, levels, topk):
  """Candidates from the distances of every anchor to every gt (all levels at once, padded).

  The k first of a level by (dist, ky, cy, kx, cx, index): everything below the k-th
  distance, then the tied ones refined key by key, finally by index; ``need`` counts what is
  still missing.  Returns ``(L * k, G)`` anchor indices and selection, as the grid path.
  """
  counts = [count for _, count, _ in levels]
  table = np.zeros((len(levels), max(counts)), np.int32)  # (L, M): anchor index, padded
  for l, (start, count, _) in enumerate(levels):
    table[l, :count] = start + np.arange(count)
  real = np.arange(table.shape[1]) < np.array(counts)[:, None]
  cx = (anchors[table, 0] + anchors[table, 2]) / 2.
  cy = (anchors[table, 1] + anchors[table, 3]) / 2.
  ok = real & valid[table]  # (L, M)
  kx = squared(cx - gt_cx[:, None, None])  # (G, L, M)
  ky = squared(cy - gt_cy[:, None, None])
  dist = jnp.where(ok, jnp.sqrt(kx + ky), jnp.inf)
  k = min(topk, table.shape[1])
  # (Reading all k values of top_k matters: XLA turns a top_k of which only the last value
  # is read into a full sort.)
  kth = lambda x, i: jnp.take_along_axis(-jax.lax.top_k(-x, k)[0], i, axis=-1)
  d_k = -jnp.min(jax.lax.top_k(-dist, k)[0], axis=-1, keepdims=True)
  chosen = dist < d_k
  tied = ok & (dist == d_k)
  need = k - jnp.sum(chosen, axis=-1, keepdims=True)
  for key in (ky, cy, kx, cx):
    key = jnp.where(tied, key, jnp.inf)
    key_r = kth(key, jnp.maximum(need - 1, 0))
    below = tied & (key < key_r)
    chosen |= below
    need -= jnp.sum(below, axis=-1, keepdims=True)
    tied &= key == key_r
  # Finally the lowest indices: top_k of a 0/1 mask lists its ones in index order.
  first_tied = jax.lax.top_k(tied.astype(jnp.float32), k)[1]
  last = jnp.take_along_axis(first_tied, jnp.maximum(need - 1, 0), axis=-1)
  chosen = ok & (chosen | (tied & (np.arange(table.shape[1]) <= last)))
  is_chosen, pos = jax.lax.top_k(chosen.astype(jnp.float32), k)  # (G, L, k), index order
  cand = jnp.asarray(table)[np.arange(len(levels))[:, None], pos]
  num_gts = cand.shape[0]
  return cand.reshape(num_gts, -1).T, (is_chosen > 0).reshape(num_gts, -1).T


def _assign_candidates(anchors, gt_boxes, gt_labels, gt_mask, valid, cand, selected):
  """Steps 2-4 on the candidate pairs ``cand (C, G)`` (anchor indices) of which ``selected``."""
  num_anchors, num_gts = anchors.shape[0], gt_boxes.shape[0]
  boxes = anchors[cand]  # (C, G, 4)
  gts = gt_boxes[None]  # (1, G, 4)
  iou = box_iou_aligned(boxes, gts)  # mmdetection's bbox_overlaps, op for op

  count = jnp.sum(selected, axis=0).astype(jnp.float32)
  mean = jnp.sum(jnp.where(selected, iou, 0.), axis=0) / count
  dev = jnp.where(selected, iou - mean, 0.)
  std = jnp.sqrt(jnp.sum(dev * dev, axis=0) / (count - 1.))  # unbiased
  threshold = mean + std  # NaN with a single candidate: nothing passes, as in torch

  cx = (boxes[..., 0] + boxes[..., 2]) / 2.
  cy = (boxes[..., 1] + boxes[..., 3]) / 2.
  side = jnp.minimum(jnp.minimum(cx - gts[..., 0], cy - gts[..., 1]),
                     jnp.minimum(gts[..., 2] - cx, gts[..., 3] - cy))
  positive = selected & (iou >= threshold) & (side > CENTER_EPS) & gt_mask

  # An anchor positive for several gts: the highest IoU, then the lowest gt row.
  score = materialize(jnp.where(positive, iou, -INF)).reshape(-1)
  flat = cand.reshape(-1)
  best = jnp.full((num_anchors,), -INF, jnp.float32).at[flat].max(score)
  rows = jnp.broadcast_to(jnp.arange(num_gts, dtype=jnp.int32), cand.shape).reshape(-1)
  winner = jnp.where((score > -INF) & (score == best[flat]), rows, num_gts)
  gt_index = jnp.full((num_anchors,), num_gts, jnp.int32).at[flat].min(winner)

  gt_index = jnp.where(gt_index < num_gts, gt_index, BACKGROUND)
  has_gt = jnp.any(gt_mask)
  gt_index = jnp.where(has_gt, gt_index, BACKGROUND)
  max_overlap = jnp.where(has_gt, best, 0.)
  gt_index = jnp.where(valid, gt_index, IGNORED)
  max_overlap = jnp.where(valid, max_overlap, 0.)
  labels = jnp.where(gt_index >= 0,
                     jnp.asarray(gt_labels, jnp.int32)[jnp.maximum(gt_index, 0)], -1)
  return Assignment(gt_index=gt_index, labels=labels, max_overlap=max_overlap)


def _no_gt(valid):
  gt_index = jnp.where(valid, BACKGROUND, IGNORED).astype(jnp.int32)
  return Assignment(gt_index=gt_index, labels=jnp.full(valid.shape, -1, jnp.int32),
                    max_overlap=jnp.zeros(valid.shape, jnp.float32))


def _check_args(anchors, gt_boxes, gt_labels, gt_mask, valid, num_level_anchors, topk,
                featmap_sizes):
  """Validates the arguments; returns ``[(start, count, (h, w) or None)]`` per level.

  Without ``num_level_anchors`` the counts follow from ``featmap_sizes`` (same anchors per
  location on every level)."""
  check_inputs(anchors, gt_boxes, gt_labels, gt_mask, valid)
  num_anchors = np.shape(anchors)[0]
  if not isinstance(topk, numbers.Integral) or isinstance(topk, bool) or topk < 1:
    raise ValueError(f'topk must be a positive int, got {topk!r}')
  sizes = None
  if featmap_sizes is not None:
    sizes = [tuple(s) for s in featmap_sizes]
    if not sizes or not all(
        len(s) == 2 and all(isinstance(v, numbers.Integral) and v >= 1 for v in s)
        for s in sizes):
      raise ValueError(f'featmap_sizes must hold one (h, w) pair of positive ints per level, '
                       f'got {featmap_sizes!r}')
    sizes = [(int(h), int(w)) for h, w in sizes]
  if num_level_anchors is None:
    cells = sum(h * w for h, w in sizes)
    if num_anchors % cells:
      raise ValueError(f'featmap_sizes {tuple(sizes)} have {cells} locations, which do not '
                       f'divide the {num_anchors} anchors (pass num_level_anchors if levels '
                       f'have different anchors per location)')
    num_level_anchors = [h * w * (num_anchors // cells) for h, w in sizes]
  counts = tuple(num_level_anchors)
  if not all(isinstance(n, numbers.Integral) and n >= 0 for n in counts):
    raise ValueError(f'num_level_anchors must be non-negative ints, got {counts}')
  if sum(counts) != num_anchors:
    raise ValueError(f'num_level_anchors {counts} sum to {sum(counts)}, but there are '
                     f'{num_anchors} anchors')
  starts = np.cumsum((0,) + counts)[:-1].tolist()
  if sizes is None:
    return [(s, n, None) for s, n in zip(starts, counts)]
  if len(sizes) != len(counts):
    raise ValueError(f'featmap_sizes must hold one (h, w) pair of positive ints per level '
                     f'({len(counts)} levels), got {featmap_sizes!r}')
  for n, (h, w) in zip(counts, sizes):
    if n == 0 or n % (h * w):
      raise ValueError(f'a level of featmap size {(h, w)} must hold a positive multiple of '
                       f'{h * w} anchors, num_level_anchors gives {n}')
  return [(s, n, hw) for s, n, hw in zip(starts, counts, sizes)]
