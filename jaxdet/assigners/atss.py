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


def _materialize(x):
  """``x`` unchanged, but computed once: XLA:CPU fuses cheap producers into every consumer,
  which here would recompute them for every pair of a pairwise comparison (a reduction is
  never duplicated that way)."""
  lowest = -jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype).min
  return jnp.max(jnp.stack([x, jnp.full_like(x, lowest)]), axis=0)


def _rank(*keys):
  """Rank of each entry along the last axis in the order (keys..., position), most
  significant key first: (..., m) arrays -> (..., m) int32, a permutation of 0 .. m - 1."""
  m = keys[0].shape[-1]
  before = jnp.asarray(np.arange(m)[None, :] < np.arange(m)[:, None])  # [j, i]: i before j
  for key in reversed(keys):
    a, b = key[..., None, :], key[..., :, None]
    before = (a < b) | ((a == b) & before)
  return jnp.sum(before, axis=-1, dtype=jnp.int32)


def _nearest_lines(centres, line_ok, g, topk):
  """The ``min(topk, N)`` lines (columns or rows) of each level nearest to ``g``, in order.

  centres: (L, n, N) float32 line centres per level and base anchor, increasing along N by a
  regular step; line_ok: (L, n, N) bool, valid lines (a prefix: padding lines are invalid);
  g: (G,) gt centres.  Lines are ranked by (key, centre), key = (centre - g)**2 rounded as in
  the distance, invalid lines last.

  Returns (G, L, n, k) arrays: line index, key, centre, validity, in rank order.

  Why the 2k + 2 lines around the p valid lines left of g hold the k first: keys decrease up
  to line p - 1 and increase from p; a line right of ``p + k - 1`` comes after the k lines
  p .. p + k - 1 (keys no larger, centres smaller), one left of ``p - k`` after the k lines
  p - k .. p - 1 (keys strictly smaller: the lines are a step apart, and their squares differ
  in float32 while |coordinates| < 1e6 px).  p is estimated from the step to within 1.
  """
  num_lines = centres.shape[-1]
  width = min(2 * topk + 2, num_lines)
  num_valid = jnp.sum(line_ok, axis=-1)  # (L, n)
  first, last = centres[..., 0], jnp.take_along_axis(
      centres, jnp.maximum(num_valid - 1, 0)[..., None], axis=-1)[..., 0]
  step = (last - first) / jnp.maximum(num_valid - 1, 1)
  step = jnp.where(step > 0, step, 1.)
  g = g[:, None, None]  # (G, 1, 1)
  left = jnp.ceil((jnp.clip(g, first - step, last + step) - first) / step)
  left = jnp.clip(left.astype(jnp.int32), 0, num_valid)  # (G, L, n), within 1 of p
  start = _materialize(jnp.clip(left - topk - 1, 0, num_lines - width))
  lines = start[..., None] + np.arange(width)  # (G, L, n, width)
  gather = lambda x, i: jnp.take_along_axis(jnp.broadcast_to(x, i.shape[:-1] + x.shape[-1:]),
                                            i, axis=-1)
  key = _materialize(jnp.where(gather(line_ok, lines), _sq(gather(centres, lines) - g[..., None]),
                               jnp.inf))
  rank = _rank(key)  # centre order = position order within the window
  # Window position of rank r (an integer sum, which XLA vectorises, unlike a float one).
  pos = jnp.sum(jnp.where(rank[..., None, :] == np.arange(min(topk, width))[:, None],
                          np.arange(width), 0), axis=-1)
  ranked = start[..., None] + pos
  return ranked, gather(key, pos), gather(centres, ranked), gather(line_ok, ranked)


def _grid_tables(levels):
  """Static anchor indices of each level's first row and first column, padded to a box.

  Returns ``cols[l, b, i]``: the index of the anchor (row 0, column i, base anchor b) of
  level l, ``rows[l, b, j]`` that of (row j, column 0, b), masks of their real entries, and
  per-level (start, width, anchors per location) as (L, 1, 1) arrays.
  """
  per_loc = [count // (h * w) for _, count, (h, w) in levels]
  n = max(per_loc)
  max_h = max(h for _, _, (h, _) in levels)
  max_w = max(w for _, _, (_, w) in levels)
  cols = np.zeros((len(levels), n, max_w), np.int32)
  rows = np.zeros((len(levels), n, max_h), np.int32)
  cols_real, rows_real = np.zeros(cols.shape, bool), np.zeros(rows.shape, bool)
  for l, ((start, _, (h, w)), b) in enumerate(zip(levels, per_loc)):
    cols[l, :b, :w] = start + np.arange(w)[None, :] * b + np.arange(b)[:, None]
    rows[l, :b, :h] = start + np.arange(h)[None, :] * w * b + np.arange(b)[:, None]
    cols_real[l, :b, :w] = rows_real[l, :b, :h] = True
  start, width, per_loc = (np.array(x, np.int32).reshape(-1, 1, 1) for x in (
      [s for s, _, _ in levels], [w for _, _, (_, w) in levels], per_loc))
  return cols, cols_real, rows, rows_real, (start, width, per_loc)


def _grid_candidates(anchors, valid, gt_cx, gt_cy, levels, topk):
  """Candidates found on each level's grid, all levels at once (padded to the largest).

  Returns ``cand (G, L * topk)`` int32 anchor indices and ``selected (G, L * topk)`` bool, which
  of them are candidates (a level with fewer than topk valid anchors fills fewer).
  """
  num_anchors = anchors.shape[0]
  cols, cols_real, rows, rows_real, (start, width, per_loc) = _grid_tables(levels)
  cx = (anchors[cols, 0] + anchors[cols, 2]) / 2.  # (L, n, W): column centres
  cy = (anchors[rows, 1] + anchors[rows, 3]) / 2.  # (L, n, H): row centres
  col, kx, cx, col_ok = _nearest_lines(cx, cols_real & valid[cols], gt_cx, topk)
  row, ky, cy, row_ok = _nearest_lines(cy, rows_real & valid[rows], gt_cy, topk)
  # The cells of column rank a and row rank b with (a + 1) * (b + 1) <= topk, by (b, a).
  row_rank, col_rank = (np.array(r) for r in zip(*[
      (b, a) for b in range(row.shape[-1]) for a in range(col.shape[-1])
      if (a + 1) * (b + 1) <= topk]))
  cell = lambda x, r: jnp.swapaxes(x[..., r], -1, -2)  # (G, L, n, k) -> (G, L, P, n)
  n = cols.shape[1]
  index = start + (cell(row, row_rank) * width + cell(col, col_rank)) * per_loc + np.arange(n)
  index = jnp.clip(index, 0, num_anchors - 1)  # padding cells point anywhere: invalid below
  ok = cell(col_ok, col_rank) & cell(row_ok, row_rank) & valid[index]
  dist = _materialize(jnp.sqrt(jnp.where(ok, cell(kx, col_rank) + cell(ky, row_rank), jnp.inf)))
  flat = lambda x: x.reshape(x.shape[:2] + (-1,))  # (G, L, P * n)
  if n == 1:
    # Cells are listed by (row rank, column rank), i.e. by (ky, cy, kx, cx).
    rank = _rank(flat(dist))
  else:
    # Lines of different base anchors interleave: order ties by joint (key, centre) ranks.
    second = (cell(_joint_rank(ky, cy), row_rank) * (n * col.shape[-1])
              + cell(_joint_rank(kx, cx), col_rank)) * n + np.arange(n)
    rank = _rank(flat(dist), flat(second))
  # Invalid cells (dist inf) rank last; the cells of rank < topk, listed by rank, are the
  # candidates (the level has fewer if fewer of its anchors are valid).
  k = min(topk, rank.shape[-1])
  pos = jnp.sum(jnp.where(rank[..., None, :] == np.arange(k)[:, None],
                          np.arange(rank.shape[-1]), 0), axis=-1)  # (G, L, k)
  cand = jnp.take_along_axis(flat(index), pos, axis=-1)
  selected = jnp.take_along_axis(flat(ok), pos, axis=-1)
  num_gts = index.shape[0]
  return cand.reshape(num_gts, -1), selected.reshape(num_gts, -1)


def _joint_rank(key, centre):
  """(G, L, n, k) line keys of n base anchors -> rank among all n * k by (key, centre); equal
  (key, centre) pairs share a rank."""
  shape = key.shape
  key, centre = (x.reshape(shape[:2] + (-1,)) for x in (key, centre))
  before = (key[..., :, None] < key[..., None, :]) | (
      (key[..., :, None] == key[..., None, :]) & (centre[..., :, None] < centre[..., None, :]))
  return jnp.sum(before, axis=-2, dtype=jnp.int32).reshape(shape)


def _dense_candidates(anchors, valid, gt_cx, gt_cy, levels, topk):
  """Candidates from the distances of every anchor to every gt, level by level.

  The k first by (dist, ky, cy, kx, cx, index): everything below the k-th distance, then the
  tied ones refined key by key, finally by index; ``need`` counts what is still missing.
  Returns ``(G, C)`` anchor indices and selection, as the grid path (other C).
  """
  cx = (anchors[:, 0] + anchors[:, 2]) / 2.
  cy = (anchors[:, 1] + anchors[:, 3]) / 2.
  cands, selected = [], []
  for start, count, _ in levels:
    if count == 0:
      continue
    level = slice(start, start + count)
    kx = _sq(cx[None, level] - gt_cx[:, None])  # (G, n)
    ky = _sq(cy[None, level] - gt_cy[:, None])
    ok = valid[None, level]
    dist = jnp.where(ok, jnp.sqrt(kx + ky), jnp.inf)
    k = min(topk, count)
    d_k = -jax.lax.top_k(-dist, k)[0][:, -1:]
    chosen = dist < d_k
    tied = ok & (dist == d_k)
    need = k - jnp.sum(chosen, axis=1, keepdims=True)
    for key in (ky, cy[None, level], kx, cx[None, level]):
      key = jnp.where(tied, key, jnp.inf)
      key_r = jnp.take_along_axis(-jax.lax.top_k(-key, k)[0], jnp.maximum(need - 1, 0), axis=1)
      below = tied & (key < key_r)
      chosen |= below
      need -= jnp.sum(below, axis=1, keepdims=True)
      tied &= key == key_r
    chosen |= tied & (jnp.cumsum(tied, axis=1) <= need)
    chosen &= ok
    is_chosen, pos = jax.lax.top_k(chosen.astype(jnp.float32), k)  # keeps index order
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
