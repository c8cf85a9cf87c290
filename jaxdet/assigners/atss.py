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

* dense (``featmap_sizes=None``): distances of every anchor to every gt (A x G) and a per-level
  selection -- simple but slow on a CPU (~0.5 s per image at 20k anchors x 128 gts on 2 cores);
* grid (``featmap_sizes`` given; ~1 ms per image there): a level's anchors form a regular
  grid, so a cell's squared distance is ``fl(kx[column] + ky[row])``, non-decreasing in each
  term.  Rank the columns by (kx, centre) and the rows by (ky, centre).  The cell at column
  rank ``a`` and row rank ``b`` (1-based) comes after every other cell of the block of
  columns ranked <= a and rows ranked <= b: each has a distance no larger (float32 rounding
  is monotone) and, on an equal distance, keys and centres no larger in the order above.  So
  a cell with ``a * b > topk`` has ``topk`` cells before it and is never a candidate: the
  candidates lie in the "hyperbolic" set ``a * b <= topk`` (23 cells for topk 9 instead of
  the whole level), wherever the gt is (far outside the image too) and however small the
  level or its valid region.  The ``topk`` nearest columns (rows) are consecutive and are
  found in a window of ``2 topk + 2`` lines around the gt; the exact top-k is then picked
  among the 23 cells by counting predecessors.  With several anchors per location the
  argument runs per base anchor (their centres may differ by rounding) and the union is
  ranked together.  This needs the anchors to be the regular grid of mmdetection's
  ``AnchorGenerator`` (or ``jaxdet.priors.anchor_grid``) in its order (level, row, column,
  base anchor), ``valid`` to be mmdetection's valid flags (per level, the locations of the
  first rows and columns), and |coordinates| < 1e6 px.

Every product is rounded to float32 before it is summed (XLA would otherwise fuse it into an
FMA), so distances and IoUs are those of mmdetection's float32 torch code bit for bit.  Its
``std`` accumulates in double; here it is float32, which can move the threshold by an ulp.
Not supported: ``gt_bboxes_ignore`` and DDOD's cost-based ``alpha`` variant.
"""
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from jaxdet.assigners.assignment import BACKGROUND, IGNORED, Assignment, check_inputs
from jaxdet.ops.boxes import box_iou_aligned, rounded

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
      used (same result, a few hundred times faster on a CPU; see the module docstring for
      what it assumes of the anchors); level ``l`` then holds ``h * w * n`` anchors, ``n``
      anchors per location.

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


def _sq(x):
  return rounded(x * x)


def _materialize(x):
  """``x`` unchanged, but computed once: XLA:CPU fuses cheap producers into every consumer,
  which here would recompute them for every pair of a pairwise comparison (a reduction is
  never duplicated that way)."""
  lowest = -jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype).min
  return jnp.max(jnp.stack([x, jnp.full_like(x, lowest)]), axis=0)


# Layout: the gt axis G is the LAST axis of every (..., G) array below.  Pairwise comparisons
# then run along G in contiguous memory, which XLA:CPU vectorises (about 15x faster than with
# the compared axis last).

def _rank(*keys):
  """Rank of each entry along axis -2 in the order (keys..., position), most significant key
  first: (..., m, G) arrays -> (..., m, G) int32, per G a permutation of 0 .. m - 1."""
  m = keys[0].shape[-2]
  before = np.arange(m)[None, :, None] < np.arange(m)[:, None, None]  # [j, i]: i before j
  for key in reversed(keys):
    a, b = key[..., None, :, :], key[..., :, None, :]
    before = (a < b) | ((a == b) & before)
  return jnp.sum(before, axis=-2, dtype=jnp.int32)


def _position_of_rank(rank, k):
  """(..., m, G) ranks -> (..., k, G): the position holding rank 0 .. k - 1."""
  m = rank.shape[-2]
  hit = rank[..., None, :, :] == np.arange(k)[:, None, None]  # (..., k, m, G)
  return jnp.sum(jnp.where(hit, np.arange(m)[:, None], 0), axis=-2)


def _take(x, index):
  """``x[..., index[..., j, g], g]``: (..., N, G or 1) gathered along axis -2 by (..., m, G)."""
  return jnp.take_along_axis(jnp.broadcast_to(x, index.shape[:-2] + x.shape[-2:-1]
                                              + index.shape[-1:]), index, axis=-2)


def _nearest_lines(centres, line_ok, g, topk):
  """The ``min(topk, N)`` lines (columns or rows) of each level nearest to ``g``, in order.

  centres: (L, n, N) float32 line centres per level and base anchor, increasing along N by a
  regular step; line_ok: (L, n, N) bool, valid lines (a prefix: padding lines are invalid);
  g: (L, 1, G) gt centres.  Lines are ranked by (key, centre), key = (centre - g)**2 rounded
  as in the distance, invalid lines last.  (Columns and rows go through together: L counts
  both.)

  Returns (L, n, k, G) arrays: line index, key, centre, validity, in rank order.

  With p valid lines left of g, keys decrease up to line p - 1 and increase from p (strictly:
  lines are a step apart, and their squares differ in float32 while |coordinates| < 1e6 px).
  So the k first are the k consecutive lines from ``lo``, the first line whose key is no
  larger than that of the line k further (lower lines win ties), and lo lies in [p - k, p];
  p is estimated from the step to within 1, so a window of 2k + 2 lines holds them.
  """
  num_lines = centres.shape[-1]
  k = min(topk, num_lines)
  width = min(2 * k + 2, num_lines)
  num_valid = jnp.sum(line_ok, axis=-1, keepdims=True)  # (L, n, 1)
  first = centres[..., :1]
  last = jnp.take_along_axis(centres, jnp.maximum(num_valid - 1, 0), axis=-1)
  step = (last - first) / jnp.maximum(num_valid - 1, 1)
  step = jnp.where(step > 0, step, 1.)
  left = jnp.ceil((jnp.clip(g, first - step, last + step) - first) / step)  # (L, n, G)
  left = jnp.clip(left.astype(jnp.int32), 0, num_valid)  # within 1 of p
  start = _materialize(jnp.clip(left - k - 1, 0, num_lines - width))[..., None, :]
  lines = start + np.arange(width)[:, None]  # (L, n, width, G)
  centres, line_ok = centres[..., None], line_ok[..., None]  # (L, n, N, 1)
  key = _materialize(jnp.where(_take(line_ok, lines), _sq(_take(centres, lines) - g[..., None, :]),
                               jnp.inf))
  lo = jnp.sum(key[..., :width - k, :] > key[..., k:, :], axis=-2, dtype=jnp.int32)
  key = _take(key, lo[..., None, :] + np.arange(k)[:, None])  # the k first, by centre
  order = _position_of_rank(_rank(key), k)  # by key, the lower line on equal keys
  ranked = start + lo[..., None, :] + order
  return (_materialize(ranked), _materialize(_take(key, order)),
          _materialize(_take(centres, ranked)), _take(line_ok, ranked))


def _grid_tables(levels):
  """Static anchor indices of each level's first row and first column, padded to a box.

  Returns ``cols[l, b, i]``: the index of the anchor (row 0, column i, base anchor b) of
  level l, ``rows[l, b, j]`` that of (row j, column 0, b), masks of their real entries, and
  per-level (start, width, anchors per location) as (L, 1, 1, 1) arrays.
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
  start, width, per_loc = (np.array(x, np.int32).reshape(-1, 1, 1, 1) for x in (
      [s for s, _, _ in levels], [w for _, _, (_, w) in levels], per_loc))
  return cols, cols_real, rows, rows_real, (start, width, per_loc)


def _joint_rank(key, centre):
  """(L, n, k, G) line keys of n base anchors -> rank among all n * k of a level by (key,
  centre); equal (key, centre) pairs share a rank."""
  shape = key.shape
  key, centre = (x.reshape((shape[0], -1, shape[-1])) for x in (key, centre))
  a, b = (key[:, None], centre[:, None]), (key[:, :, None], centre[:, :, None])  # [l, j, i, G]
  before = (a[0] < b[0]) | ((a[0] == b[0]) & (a[1] < b[1]))
  return jnp.sum(before, axis=-2, dtype=jnp.int32).reshape(shape)


def _grid_candidates(anchors, valid, gt_cx, gt_cy, levels, topk):
  """Candidates found on each level's grid, all levels at once (padded to the largest).

  Returns ``cand (L * topk, G)`` int32 anchor indices and ``selected (L * topk, G)`` bool, which
  of them are candidates (a level with fewer than topk valid anchors fills fewer).
  """
  num_anchors = anchors.shape[0]
  cols, cols_real, rows, rows_real, (start, width, per_loc) = _grid_tables(levels)
  # Columns (x) and rows (y) of all levels side by side: (2L, n, N), N = max(W, H).
  size = max(cols.shape[-1], rows.shape[-1])
  pad = lambda x: np.pad(x, ((0, 0), (0, 0), (0, size - x.shape[-1])))
  lines, lines_real = np.concatenate([pad(cols), pad(rows)]), np.concatenate(
      [pad(cols_real), pad(rows_real)])
  cx = (anchors[:, 0] + anchors[:, 2]) / 2.
  cy = (anchors[:, 1] + anchors[:, 3]) / 2.
  centres = jnp.concatenate([cx[pad(cols)], cy[pad(rows)]])
  g = jnp.concatenate([jnp.broadcast_to(gt_cx, (len(levels), 1) + gt_cx.shape),
                       jnp.broadcast_to(gt_cy, (len(levels), 1) + gt_cy.shape)])
  k = min(topk, size)
  found = _nearest_lines(centres, lines_real & valid[lines], g, topk)  # (2L, n, k, G) each
  (col, kx, cx, col_ok), (row, ky, cy, row_ok) = zip(*[
      (x[:len(levels), :, :min(k, cols.shape[-1])], x[len(levels):, :, :min(k, rows.shape[-1])])
      for x in found])
  # The cells of column rank a and row rank b with (a + 1) * (b + 1) <= topk, listed by (b, a).
  row_rank, col_rank = (np.array(r) for r in zip(*[
      (b, a) for b in range(row.shape[-2]) for a in range(col.shape[-2])
      if (a + 1) * (b + 1) <= topk]))
  cell = lambda x, r: jnp.swapaxes(x[:, :, r], 1, 2)  # (L, n, k, G) -> (L, P, n, G)
  n = cols.shape[1]
  index = (start + (cell(row, row_rank) * width + cell(col, col_rank)) * per_loc
           + np.arange(n)[:, None])
  index = jnp.clip(index, 0, num_anchors - 1)  # padding cells point anywhere: invalid below
  ok = cell(col_ok, col_rank) & cell(row_ok, row_rank) & valid[index]
  dist = _materialize(jnp.sqrt(jnp.where(ok, cell(kx, col_rank) + cell(ky, row_rank), jnp.inf)))
  flat = lambda x: x.reshape((x.shape[0], -1, x.shape[-1]))  # (L, P * n, G)
  if n == 1:
    # Cells are listed by (row rank, column rank), i.e. by (ky, cy, kx, cx).
    rank = _rank(flat(dist))
  else:
    # Lines of different base anchors interleave: order ties by joint (key, centre) ranks.
    second = (cell(_joint_rank(ky, cy), row_rank) * (n * col.shape[-2])
              + cell(_joint_rank(kx, cx), col_rank)) * n + np.arange(n)[:, None]
    rank = _rank(flat(dist), flat(second))
  # Invalid cells (dist inf) rank last; the cells of rank < topk, listed by rank, are the
  # candidates (fewer valid ones where fewer anchors of the level are valid).
  pos = _position_of_rank(rank, min(topk, rank.shape[-2]))  # (L, k, G)
  cand = jnp.take_along_axis(flat(index), pos, axis=-2)
  selected = jnp.take_along_axis(flat(ok), pos, axis=-2)
  num_gts = index.shape[-1]
  return cand.reshape(-1, num_gts), selected.reshape(-1, num_gts)


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
  kx = _sq(cx - gt_cx[:, None, None])  # (G, L, M)
  ky = _sq(cy - gt_cy[:, None, None])
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
  score = _materialize(jnp.where(positive, iou, -INF)).reshape(-1)
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
  """Validates the arguments; returns ``[(start, count, (h, w) or None)]`` per level."""
  check_inputs(anchors, gt_boxes, gt_labels, gt_mask, valid)
  num_anchors = np.shape(anchors)[0]
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
