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
the smaller squared vertical offset ``dy**2``, then the smaller ``dx**2``, then the lower
anchor index.  That rule is what makes the two equivalent ways of finding the candidates give
the same anchors, bit for bit:

* dense (``featmap_sizes=None``): distances of every anchor to every gt (A x G), per-level
  selection -- simple, ~30 ms per image on a 2-core CPU at 20k anchors x 128 gts;
* grid (``featmap_sizes`` given): anchors of a level form a regular grid whose centres are
  ``cx[column]``, ``cy[row]``, so a cell's squared distance is ``kx[column] + ky[row]`` and is
  non-decreasing in each term.  Rank the columns by ``(kx, column)`` and the rows by
  ``(ky, row)``; the cell at column rank ``a`` and row rank ``b`` (1-based) is preceded, in the
  order (distance, ky, kx, index), by every other cell of the ``a x b`` block of columns
  ranked <= a and rows ranked <= b -- each has distance <= its own (float32 rounding is
  monotone), and on an equal distance it has ky <= and kx <= with ties falling back on a
  lower row, column and so index.  So a cell with ``a * b > topk`` has at least ``topk``
  predecessors and is never selected: the candidates lie in the "hyperbolic" set
  ``a * b <= topk`` of the ``topk`` nearest columns x ``topk`` nearest rows (23 cells for
  ``topk = 9`` instead of the whole level), whatever the gt's position (far outside the image
  too) and however small the level or its valid region.  The exact top-k is then picked among
  those cells by counting predecessors.  With several anchors per location the argument runs
  per base anchor (their centres may differ by rounding) and the union is ranked together.
  This needs the anchors to be the regular grid mmdetection's ``AnchorGenerator`` (or
  ``jaxdet.priors.anchor_grid``) produces, in its order (level, row, column, base anchor),
  and ``valid`` to be a rectangle of locations per level, as mmdetection's valid flags are.

Every product is rounded to float32 before it is summed (XLA would otherwise fuse it into an
FMA), so distances and IoUs are those of mmdetection's float32 torch code bit for bit.  Its
``std`` accumulates in double; here it is float32, which can move the threshold by an ulp.
Not supported: ``gt_bboxes_ignore`` and DDOD's cost-based ``alpha`` variant.
"""
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from jaxdet.assigners.assignment import BACKGROUND, IGNORED, Assignment

INF = 100000000.  # mmdetection's ATSSAssigner INF: max_overlap of unassigned anchors is -INF
CENTER_EPS = 0.01  # an anchor centre must be more than this inside each side of the gt


def atss_assign(anchors, gt_boxes, gt_labels, gt_mask, *, num_level_anchors, topk=9,
                valid=None, featmap_sizes=None):
  """Assigns each anchor to a gt or background, exactly as mmdetection's ATSSAssigner.

  Args:
    anchors: (A, 4) float32, xyxy, input pixels; levels concatenated.
    gt_boxes: (G, 4) float32, xyxy, input pixels; rows where ``gt_mask`` is False are ignored.
    gt_labels: (G,) int32 class of each gt.
    gt_mask: (G,) bool, True for real gts.
    num_level_anchors: static ints, anchors per level (sum = A), as in the anchors' order.
    topk: candidates per level and gt (ATSS: 9).
    valid: optional (A,) bool, mmdetection's valid flags (anchors on the image's own padded
      area); invalid anchors are never candidates and come out ignored.
    featmap_sizes: optional static ``((h, w), ...)`` per level.  Given, the fast grid path is
      used (same result; see the module docstring for what it assumes of the anchors);
      level ``l`` then holds ``h * w * n`` anchors, ``n`` anchors per location.

  Returns:
    ``Assignment`` with (A,) ``gt_index`` (>= 0 gt row, -1 background, -2 invalid anchor),
    ``labels`` (class of the assigned gt, else -1) and ``max_overlap`` (IoU with the assigned
    gt; -1e8 for background when the image has gts, 0 when it has none, 0 for invalid anchors).
  """
  levels = _check_args(anchors, gt_boxes, gt_labels, gt_mask, valid, num_level_anchors, topk,
                       featmap_sizes)
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
  if featmap_sizes is None:
    cand, selected = _dense_candidates(anchors, valid, gt_cx, gt_cy, levels, topk)
  else:
    cand, selected = _grid_candidates(anchors, valid, gt_cx, gt_cy, levels, topk)
  return _assign_candidates(anchors, gt_boxes, gt_labels, gt_mask, valid, cand, selected)


def _rounded(x):
  """``x``, materialised as rounded float32 so XLA cannot fuse it into an FMA with a later add.

  (The ``x == x`` test is opaque to LLVM's contraction; NaN stays NaN.)
  """
  return jnp.where(x == x, x, jnp.nan)


def _sq(x):
  return _rounded(x * x)


def _precedes(d1, ky1, kx1, i1, d2, ky2, kx2, i2):
  """True where candidate 1 comes before candidate 2 in the order (d, ky, kx, index)."""
  return (d1 < d2) | ((d1 == d2) & (
      (ky1 < ky2) | ((ky1 == ky2) & ((kx1 < kx2) | ((kx1 == kx2) & (i1 < i2))))))


def _grid_candidates(anchors, valid, gt_cx, gt_cy, levels, topk):
  """Candidates found on each level's grid.

  Returns ``cand (G, C)`` int32 anchor indices (C = candidates over all levels, static) and
  ``selected (G, C)`` bool: the anchors step 1 selects (the rest are other cells looked at).
  """
  cands, selected = [], []
  for start, count, (height, width) in levels:
    per_loc = count // (height * width)
    level = anchors[start:start + count].reshape(height, width, per_loc, 4)
    cx = ((level[0, :, :, 0] + level[0, :, :, 2]) / 2.).T  # (n, W): column centres
    cy = ((level[:, 0, :, 1] + level[:, 0, :, 3]) / 2.).T  # (n, H): row centres
    level_valid = valid[start:start + count].reshape(height, width, per_loc)
    col_ok = level_valid.any(axis=(0, 2))
    row_ok = level_valid.any(axis=(1, 2))
    kx = _sq(cx[None] - gt_cx[:, None, None])  # (G, n, W)
    ky = _sq(cy[None] - gt_cy[:, None, None])  # (G, n, H)
    n_cols, n_rows = min(topk, width), min(topk, height)
    # Columns (rows) ranked by (kx, column): top_k keeps the lower index first on ties.
    _, cols = jax.lax.top_k(-jnp.where(col_ok, kx, jnp.inf), n_cols)  # (G, n, n_cols)
    _, rows = jax.lax.top_k(-jnp.where(row_ok, ky, jnp.inf), n_rows)
    col_rank, row_rank = zip(*[(a, b) for a in range(n_cols) for b in range(n_rows)
                               if (a + 1) * (b + 1) <= topk])
    col = cols[..., np.array(col_rank)]  # (G, n, P)
    row = rows[..., np.array(row_rank)]
    kx_c = jnp.take_along_axis(kx, col, axis=-1)
    ky_c = jnp.take_along_axis(ky, row, axis=-1)
    base = jnp.arange(per_loc, dtype=jnp.int32)[None, :, None]
    index = start + (row * width + col) * per_loc + base
    num_gts = kx.shape[0]
    kx_c, ky_c, index = (x.reshape(num_gts, -1) for x in (kx_c, ky_c, index))
    ok = valid[index]
    dist = jnp.sqrt(kx_c + ky_c)
    # Exact top-k among the looked-at cells: fewer than topk valid cells precede it.
    before = _precedes(dist[:, :, None], ky_c[:, :, None], kx_c[:, :, None], index[:, :, None],
                       dist[:, None, :], ky_c[:, None, :], kx_c[:, None, :], index[:, None, :])
    rank = jnp.sum(before & ok[:, :, None], axis=1)
    cands.append(index)
    selected.append(ok & (rank < topk))
  return jnp.concatenate(cands, axis=1), jnp.concatenate(selected, axis=1)


def _dense_candidates(anchors, valid, gt_cx, gt_cy, levels, topk):
  """Candidates from the distances of every anchor to every gt: ``(G, C)`` as the grid path."""
  cx = (anchors[:, 0] + anchors[:, 2]) / 2.
  cy = (anchors[:, 1] + anchors[:, 3]) / 2.
  cands, selected = [], []
  for start, count, _ in levels:
    if count == 0:
      continue
    kx = _sq(cx[None, start:start + count] - gt_cx[:, None])  # (G, n)
    ky = _sq(cy[None, start:start + count] - gt_cy[:, None])
    ok = valid[None, start:start + count]
    dist = jnp.where(ok, jnp.sqrt(kx + ky), jnp.inf)
    k = min(topk, count)
    # The k smallest in the order (dist, ky, kx, index): everything below the k-th distance,
    # then the tied ones refined key by key; ``need`` counts what is still missing.
    d_k = -jax.lax.top_k(-dist, k)[0][:, -1:]
    chosen = dist < d_k
    tied = ok & (dist == d_k)
    need = k - jnp.sum(chosen, axis=1, keepdims=True)
    for key in (ky, kx):
      key = jnp.where(tied, key, jnp.inf)
      key_r = jnp.take_along_axis(-jax.lax.top_k(-key, k)[0], jnp.maximum(need - 1, 0), axis=1)
      below = tied & (key < key_r)
      chosen |= below
      need -= jnp.sum(below, axis=1, keepdims=True)
      tied &= key == key_r
    chosen |= tied & (jnp.cumsum(tied, axis=1) <= need)
    chosen &= ok
    # At most k chosen: list them (top_k of a 0/1 mask keeps index order).
    is_chosen, pos = jax.lax.top_k(chosen.astype(jnp.float32), k)
    cands.append(start + pos)
    selected.append(is_chosen > 0)
  return jnp.concatenate(cands, axis=1), jnp.concatenate(selected, axis=1)


def _iou_aligned(boxes1, boxes2):
  """IoU of matching rows, mmdetection's ``bbox_overlaps`` op for op (float32, eps 1e-6)."""
  area1 = _rounded((boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1]))
  area2 = _rounded((boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1]))
  lt = jnp.maximum(boxes1[..., :2], boxes2[..., :2])
  rb = jnp.minimum(boxes1[..., 2:], boxes2[..., 2:])
  wh = jnp.maximum(rb - lt, 0.)
  overlap = _rounded(wh[..., 0] * wh[..., 1])
  union = jnp.maximum(area1 + area2 - overlap, 1e-6)
  return overlap / union


def _assign_candidates(anchors, gt_boxes, gt_labels, gt_mask, valid, cand, selected):
  """Steps 2-4 on the candidate pairs ``cand (G, C)`` (anchor indices) of which ``selected``."""
  num_anchors, num_gts = anchors.shape[0], gt_boxes.shape[0]
  boxes = anchors[cand]  # (G, C, 4)
  gts = gt_boxes[:, None, :]
  iou = _iou_aligned(boxes, gts)

  count = jnp.sum(selected, axis=1, keepdims=True).astype(jnp.float32)
  mean = jnp.sum(jnp.where(selected, iou, 0.), axis=1, keepdims=True) / count
  dev = jnp.where(selected, iou - mean, 0.)
  std = jnp.sqrt(jnp.sum(dev * dev, axis=1, keepdims=True) / (count - 1.))  # unbiased
  threshold = mean + std  # NaN with a single candidate: nothing passes, as in torch

  cx = (boxes[..., 0] + boxes[..., 2]) / 2.
  cy = (boxes[..., 1] + boxes[..., 3]) / 2.
  side = jnp.stack([cx - gts[..., 0], cy - gts[..., 1], gts[..., 2] - cx, gts[..., 3] - cy], -1)
  inside = side.min(axis=-1) > CENTER_EPS
  positive = selected & (iou >= threshold) & inside & gt_mask[:, None]

  # An anchor positive for several gts: the highest IoU, then the lowest gt row.
  score = jax.lax.optimization_barrier(jnp.where(positive, iou, -INF)).reshape(-1)
  flat = cand.reshape(-1)
  best = jnp.full((num_anchors,), -INF, jnp.float32).at[flat].max(score)
  rows = jnp.broadcast_to(jnp.arange(num_gts, dtype=jnp.int32)[:, None], cand.shape)
  winner = jnp.where(positive.reshape(-1) & (score == best[flat]), rows.reshape(-1), num_gts)
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
  """Validates the arguments; returns ``[(start, count, (h, w) or None)]`` per level."""
  if np.ndim(anchors) != 2 or np.shape(anchors)[-1] != 4:
    raise ValueError(f'anchors must be (A, 4), got shape {np.shape(anchors)}')
  if np.ndim(gt_boxes) != 2 or np.shape(gt_boxes)[-1] != 4:
    raise ValueError(f'gt_boxes must be (G, 4), got shape {np.shape(gt_boxes)}')
  num_anchors, num_gts = np.shape(anchors)[0], np.shape(gt_boxes)[0]
  if np.shape(gt_labels) != (num_gts,):
    raise ValueError(f'gt_labels must be ({num_gts},), got shape {np.shape(gt_labels)}')
  if np.shape(gt_mask) != (num_gts,):
    raise ValueError(f'gt_mask must be ({num_gts},), got shape {np.shape(gt_mask)}')
  if valid is not None and np.shape(valid) != (num_anchors,):
    raise ValueError(f'valid must be ({num_anchors},), got shape {np.shape(valid)}')
  if not isinstance(topk, numbers.Integral) or isinstance(topk, bool) or topk < 1:
    raise ValueError(f'topk must be a positive int, got {topk!r}')
  counts = tuple(num_level_anchors)
  if not all(isinstance(n, numbers.Integral) and n >= 0 for n in counts):
    raise ValueError(f'num_level_anchors must be non-negative ints, got {counts}')
  if sum(counts) != num_anchors:
    raise ValueError(f'num_level_anchors {counts} sum to {sum(counts)}, but there are '
                     f'{num_anchors} anchors')
  starts = np.cumsum((0,) + counts)[:-1].tolist()
  if featmap_sizes is None:
    return [(s, n, None) for s, n in zip(starts, counts)]
  sizes = [tuple(s) for s in featmap_sizes]
  if len(sizes) != len(counts) or not all(
      len(s) == 2 and all(isinstance(v, numbers.Integral) and v >= 1 for v in s)
      for s in sizes):
    raise ValueError(f'featmap_sizes must hold one (h, w) pair of positive ints per level '
                     f'({len(counts)} levels), got {featmap_sizes!r}')
  for n, (h, w) in zip(counts, sizes):
    if n == 0 or n % (h * w):
      raise ValueError(f'a level of featmap size {(h, w)} must hold a positive multiple of '
                       f'{h * w} anchors, num_level_anchors gives {n}')
  return [(s, n, (int(h), int(w))) for s, n, (h, w) in zip(starts, counts, sizes)]
