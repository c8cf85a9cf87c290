"""ATSS step 1 on anchor grids: the ``topk`` anchors of each level nearest to each gt, found
among a few cells of each level instead of all (``jaxdet.assigners.atss.atss_assign``'s fast
path; ~1 ms per image on a 2-core CPU at 20k anchors x 128 gts, the dense path ~0.5 s).

The order is (distance, ``dy**2``, vertical centre, ``dx**2``, horizontal centre, anchor index),
that of ``atss.py``'s dense path, so both select the same anchors bit for bit.

A level's anchors form a regular grid, so a cell's squared distance is ``fl(kx[column] +
ky[row])``, non-decreasing in each term.  Rank the columns by (kx, centre) and the rows by (ky,
centre).  The cell at column rank ``a`` and row rank ``b`` (1-based) comes after every other
cell of the block of columns ranked <= a and rows ranked <= b: each has a distance no larger
(float32 rounding is monotone) and, on an equal distance, keys and centres no larger in the
order above.  So a cell with ``a * b > topk`` has ``topk`` cells before it and is never a
candidate: the candidates lie in the "hyperbolic" set ``a * b <= topk`` (23 cells for topk 9
instead of the whole level), wherever the gt is (far outside the image too) and however small
the level or its valid region.  The ``topk`` nearest columns (rows) are consecutive and are
found in a window of ``2 topk + 2`` lines around the gt; the exact top-k is then picked among
the 23 cells by counting predecessors.  With several anchors per location the argument runs per
base anchor (their centres may differ by rounding) and the union is ranked together.  This needs
the anchors to be the regular grid of mmdetection's ``AnchorGenerator`` (or
``jaxdet.priors.anchor_grid``) in its order (level, row, column, base anchor), ``valid`` to be
mmdetection's valid flags (per level, the locations of the first rows and columns), and
|coordinates| < 1e6 px.
"""
import jax.numpy as jnp
import numpy as np

from jaxdet.ops.boxes import rounded


def squared(x):
  return rounded(x * x)


def materialize(x):
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
  start = materialize(jnp.clip(left - k - 1, 0, num_lines - width))[..., None, :]
  lines = start + np.arange(width)[:, None]  # (L, n, width, G)
  centres, line_ok = centres[..., None], line_ok[..., None]  # (L, n, N, 1)
  key = materialize(jnp.where(_take(line_ok, lines), squared(_take(centres, lines) - g[..., None, :]),
                               jnp.inf))
  lo = jnp.sum(key[..., :width - k, :] > key[..., k:, :], axis=-2, dtype=jnp.int32)
  key = _take(key, lo[..., None, :] + np.arange(k)[:, None])  # the k first, by centre
  order = _position_of_rank(_rank(key), k)  # by key, the lower line on equal keys
  ranked = start + lo[..., None, :] + order
  return (materialize(ranked), materialize(_take(key, order)),
          materialize(_take(centres, ranked)), _take(line_ok, ranked))


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


def grid_candidates(anchors, valid, gt_cx, gt_cy, levels, topk):
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
  dist = materialize(jnp.sqrt(jnp.where(ok, cell(kx, col_rank) + cell(ky, row_rank), jnp.inf)))
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
