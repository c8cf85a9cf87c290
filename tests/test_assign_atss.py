"""jaxdet.assigners.atss against a slow numpy reference and hand-worked cases.

The reference follows mmdetection's ATSSAssigner rules one gt and one level at a time, in
float32 numpy (which never fuses multiply-adds), with the module's documented rule for exact
distance ties: the smaller dy**2, the upper row, the smaller dx**2, the left column, the lower
anchor index.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdet.assigners import atss, atss_grid
from jaxdet.assigners.atss import atss_assign, atss_assign_dense

F32 = np.float32
STRIDES = (8, 16, 32, 64, 128)
PAD_GT = 32  # every scene pads its gts to this count (one compile per anchor layout)


# ---------------------------------------------------------------------------- scenes

def make_anchors(image_hw, ratios, scale=8):
  """mmdetection's AnchorGenerator (centre offset 0, base size = stride) in numpy float32.

  Returns anchors (A, 4), featmap sizes and anchors per level; order level, y, x, base anchor.
  """
  anchors, sizes, counts = [], [], []
  for stride in STRIDES:
    h, w = -(-image_hw[0] // stride), -(-image_hw[1] // stride)
    h_ratios = np.sqrt(np.asarray(ratios, F32))
    w_ratios = F32(1) / h_ratios
    ws = F32(stride) * w_ratios * F32(scale)
    hs = F32(stride) * h_ratios * F32(scale)
    base = np.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], axis=-1)  # (n, 4)
    ys, xs = np.meshgrid(np.arange(h, dtype=F32) * stride, np.arange(w, dtype=F32) * stride,
                         indexing='ij')
    shifts = np.stack([xs, ys, xs, ys], axis=-1).reshape(-1, 1, 4)
    anchors.append((shifts + base[None]).reshape(-1, 4))
    sizes.append((h, w))
    counts.append(h * w * len(ratios))
  return np.concatenate(anchors).astype(F32), tuple(sizes), tuple(counts)


def make_valid(sizes, per_loc, pad_hw):
  """mmdetection's valid flags: cells whose top-left corner lies on the image's padded area."""
  flags = []
  for (h, w), stride in zip(sizes, STRIDES):
    vy = np.arange(h) < min(-(-pad_hw[0] // stride), h)
    vx = np.arange(w) < min(-(-pad_hw[1] // stride), w)
    flags.append(np.repeat((vy[:, None] & vx[None, :]).reshape(-1), per_loc))
  return np.concatenate(flags)


def random_scene(seed, num_real, image_hw, *, grid_ties=False):
  """gts of every size (1 px to larger than the image), some near or beyond the borders,
  padded to PAD_GT with garbage rows (NaN, inf, huge, anchor copies) at random positions."""
  rng = np.random.default_rng(seed)
  h, w = image_hw
  size = np.exp(rng.uniform(np.log(1.), np.log(1.5 * max(h, w)), (num_real, 2)))
  size *= np.exp(rng.uniform(-0.7, 0.7, (num_real, 2)))
  centre = rng.uniform(-0.15, 1.15, (num_real, 2)) * [w, h]
  if grid_ties:  # centres on anchor centres or midpoints, integer sizes: exact distance ties
    centre = np.round(centre / 4) * 4
    size = np.maximum(np.round(size), 1)
  boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1).astype(F32)
  if num_real > 3:  # an exact duplicate (equal IoUs at two gt rows) and a far-away gt
    boxes[1] = boxes[0]
    boxes[2] = [-3000., 40., -2900., 90.]
  gt = np.empty((PAD_GT, 4), F32)
  garbage = [[np.nan] * 4, [np.inf, -np.inf, np.inf, 1.], [-1e30, -1e30, 1e30, 1e30],
             [0., 0., 64., 64.], [-8., -8., 8., 8.]]
  for i in range(PAD_GT):
    gt[i] = garbage[i % len(garbage)]
  rows = np.sort(rng.choice(PAD_GT, num_real, replace=False))
  gt[rows] = boxes
  mask = np.zeros(PAD_GT, bool)
  mask[rows] = True
  labels = rng.integers(0, 80, PAD_GT).astype(np.int32)
  return gt, labels, mask


# ------------------------------------------------------------------------- reference

def ref_iou(anchor, gt):
  """mmdetection's bbox_overlaps for one pair, op for op in float32."""
  area1 = (anchor[2] - anchor[0]) * (anchor[3] - anchor[1])
  area2 = (gt[2] - gt[0]) * (gt[3] - gt[1])
  w = max(min(anchor[2], gt[2]) - max(anchor[0], gt[0]), F32(0))
  h = max(min(anchor[3], gt[3]) - max(anchor[1], gt[1]), F32(0))
  overlap = w * h
  return overlap / max(area1 + area2 - overlap, F32(1e-6))


def ref_candidates(anchors, box, num_level_anchors, topk, valid, *, index_ties=False):
  """Step 1 for one gt: per level, the min(topk, valid anchors) nearest valid anchors.

  Distance ties go by the smaller dy**2, then the upper centre, then the smaller dx**2, the
  left centre, the lower index (the module's documented order), or by the lower index alone
  with ``index_ties``.
  """
  level_of = np.repeat(np.arange(len(num_level_anchors)), num_level_anchors)
  acx = (anchors[:, 0] + anchors[:, 2]) / F32(2)
  acy = (anchors[:, 1] + anchors[:, 3]) / F32(2)
  gcx, gcy = (box[0] + box[2]) / F32(2), (box[1] + box[3]) / F32(2)
  candidates = []
  for level in range(len(num_level_anchors)):
    idx = np.flatnonzero((level_of == level) & valid)  # mmdetection drops invalid anchors
    kx = (acx[idx] - gcx) * (acx[idx] - gcx)
    ky = (acy[idx] - gcy) * (acy[idx] - gcy)
    dist = np.sqrt(kx + ky)
    order = np.lexsort((idx, dist) if index_ties else
                       (idx, acx[idx], kx, acy[idx], ky, dist))
    candidates += list(idx[order[:min(topk, len(idx))]])
  return candidates


def ref_atss(anchors, gt_boxes, gt_labels, gt_mask, num_level_anchors, topk, valid, *,
             index_ties=False):
  """mmdetection's ATSSAssigner, as documented, with plain loops.

  Returns (gt_index, labels, max_overlap) over all anchors, the padded gt rows' numbering.
  """
  num_anchors = len(anchors)
  gt_index = np.where(valid, -1, -2)
  labels = np.full(num_anchors, -1)
  max_overlap = np.zeros(num_anchors, F32)
  real = np.flatnonzero(gt_mask)
  if len(real) == 0:
    return gt_index, labels, max_overlap
  acx = (anchors[:, 0] + anchors[:, 2]) / F32(2)
  acy = (anchors[:, 1] + anchors[:, 3]) / F32(2)
  best = np.full(num_anchors, F32(-1e8))
  winner = np.full(num_anchors, -1)
  for g in real:  # increasing rows: a later gt must beat the IoU strictly to take an anchor
    box = gt_boxes[g]
    candidates = ref_candidates(anchors, box, num_level_anchors, topk, valid,
                                index_ties=index_ties)
    ious = np.array([ref_iou(anchors[a], box) for a in candidates], F32)
    thr = F32(np.mean(ious.astype(np.float64))) + F32(np.std(ious.astype(np.float64), ddof=1)) \
        if len(ious) > 1 else np.nan  # torch: mean in float32, std accumulated in double
    for a, iou in zip(candidates, ious):
      inside = min(acx[a] - box[0], acy[a] - box[1], box[2] - acx[a], box[3] - acy[a]) > F32(0.01)
      if iou >= thr and inside and iou > best[a]:
        best[a], winner[a] = iou, g
  assigned = winner >= 0
  gt_index[assigned] = winner[assigned]
  labels[assigned] = gt_labels[winner[assigned]]
  max_overlap = np.where(valid, best, F32(0))
  return gt_index, labels, max_overlap


# ------------------------------------------------------------------------------ tests

LAYOUTS = {  # name: (image size, ratios); 160x224: P7 is 2x2, fewer cells than topk
    'one_per_loc': ((160, 224), (1.,)),
    'three_per_loc': ((160, 224), (0.5, 1., 2.)),
}


@functools.lru_cache(maxsize=None)
def layout(name):
  image_hw, ratios = LAYOUTS[name]
  anchors, sizes, counts = make_anchors(image_hw, ratios)
  return anchors, sizes, counts, len(ratios)


@functools.lru_cache(maxsize=None)
def assign_fn(name, grid, topk=9):
  _, sizes, counts, _ = layout(name)
  if grid:
    return jax.jit(lambda a, g, l, m, v: atss_assign(a, g, l, m, sizes, topk=topk, valid=v))
  return jax.jit(lambda a, g, l, m, v: atss_assign_dense(a, g, l, m, counts, topk=topk, valid=v))


def run(name, grid, gt, labels, mask, valid, topk=9):
  anchors = layout(name)[0]
  out = assign_fn(name, grid, topk)(anchors, gt, labels, mask, valid)
  return tuple(np.asarray(x) for x in out)


def assert_same(out, ref):
  np.testing.assert_array_equal(out[0], ref[0])
  np.testing.assert_array_equal(out[1], ref[1])
  np.testing.assert_allclose(out[2], ref[2], rtol=1e-6, atol=0)


SCENES = [  # (seed, real gts, valid pad size or None, grid-aligned ties)
    (0, 1, None, False), (1, 5, None, False), (2, 30, None, False), (3, 12, (100, 150), False),
    (4, 20, (40, 60), False), (5, 8, None, True), (6, 25, (120, 200), True),
    (7, 0, (100, 150), False),
]


@pytest.mark.parametrize('name', sorted(LAYOUTS))
@pytest.mark.parametrize('grid', [False, True], ids=['dense', 'grid'])
@pytest.mark.parametrize('scene', SCENES, ids=[f'seed{s[0]}' for s in SCENES])
def test_matches_reference(name, grid, scene):
  seed, num_real, pad_hw, ties = scene
  anchors, sizes, counts, per_loc = layout(name)
  image_hw = LAYOUTS[name][0]
  gt, labels, mask = random_scene(seed, num_real, image_hw, grid_ties=ties)
  valid = make_valid(sizes, per_loc, pad_hw or image_hw)
  out = run(name, grid, gt, labels, mask, valid)
  ref = ref_atss(anchors, gt, labels, mask, counts, 9, valid)
  assert_same(out, ref)
  if num_real >= 5:  # the scene must exercise the rules, not assign nothing
    assert (out[0] >= 0).sum() > 0


def test_grid_equals_dense_on_many_scenes():
  """The fast grid path is the same function as the dense path (ties, far gts, small grids)."""
  for name in sorted(LAYOUTS):
    _, sizes, _, per_loc = layout(name)
    for seed in range(12):
      ties = seed % 2 == 0
      pad_hw = [(160, 224), (70, 90), (9, 200), (150, 17)][seed % 4]
      gt, labels, mask = random_scene(100 + seed, 4 + 2 * seed, LAYOUTS[name][0], grid_ties=ties)
      valid = make_valid(sizes, per_loc, pad_hw)
      dense = run(name, False, gt, labels, mask, valid)
      grid = run(name, True, gt, labels, mask, valid)
      for a, b in zip(dense, grid):
        np.testing.assert_array_equal(a, b)


@functools.lru_cache(maxsize=None)
def candidates_fn(counts, sizes, topk):
  """Step 1 alone (the module's private candidate finders): ``(G, C)`` anchors, selected."""
  starts = np.cumsum((0,) + counts)[:-1].tolist()
  levels = [(s, n, None if sizes is None else sizes[i])
            for i, (s, n) in enumerate(zip(starts, counts))]
  find = atss._dense_candidates if sizes is None else atss_grid.grid_candidates

  def fn(anchors, gt, mask, valid):
    gt = jnp.where(mask[:, None], gt, 0.)
    return find(anchors, valid, (gt[:, 0] + gt[:, 2]) / 2., (gt[:, 1] + gt[:, 3]) / 2.,
                levels, topk)
  return jax.jit(fn)


def candidate_sets(anchors, gt, mask, valid, counts, sizes, topk):
  """Per gt row, the set of anchors step 1 selects (``sizes`` None: the dense path)."""
  cand, selected = candidates_fn(counts, sizes, topk)(anchors, gt, mask, valid)
  cand, selected = np.asarray(cand).T, np.asarray(selected).T  # (G, C)
  assert all(len(set(c[s])) == s.sum() for c, s in zip(cand, selected))  # no duplicates
  return [set(c[s].tolist()) for c, s in zip(cand, selected)]


def test_candidates_grid_path_equals_reference():
  """Step 1: the grid path looks at few cells yet selects exactly the reference candidates.

  Scenes with exact distance ties (centres on anchor centres and midpoints), gts far outside
  the grid (a 1 x 9 column strip is then nearest), valid regions of fewer than topk cells
  (9 x 200 px: two valid rows on P3, one on P4-P7; 150 x 17: three valid columns on P3, one
  on P5-P7).  (The dense path is held to the reference by the whole-assignment tests.)
  """
  for name in sorted(LAYOUTS):
    anchors, sizes, counts, per_loc = layout(name)
    for seed in range(8):
      pad_hw = [(160, 224), (70, 90), (9, 200), (150, 17)][seed % 4]
      gt, _, mask = random_scene(100 + seed, 4 + 3 * seed, LAYOUTS[name][0],
                                 grid_ties=seed % 2 == 0)
      valid = make_valid(sizes, per_loc, pad_hw)
      grid = candidate_sets(anchors, gt, mask, valid, counts, sizes, 9)
      for g in np.flatnonzero(mask):
        ref = ref_candidates(anchors, gt[g], counts, 9, valid)
        assert len(ref) == len(set(ref))
        assert grid[g] == set(ref), (name, seed, g)


def test_candidates_tie_order_by_hand():
  """Documented tie order on two hand-worked grids (the index-only order would differ).

  1. One level of 4 x 5 cells, stride 8 (centres x 0..32, y 0..24), topk 6, gt centre (12, 12):
     4 cells at offsets (+-4, +-4), then 8 at distance sqrt(160): (+-12, +-4) and (+-4, +-12).
     dy**2 16 < 144 picks (x, y) = (0, 8) and (24, 8): indices 5 and 8 (index order: 1, 2).
  2. 13 x 13 cells, gt centred on cell (6, 6), topk 73: 69 cells have (dx, dy) with
     dx**2 + dy**2 < 25 cells**2, then 12 tie at 5 cells: (+-5, 0), (0, +-5), (+-3, +-4),
     (+-4, +-3) -- Pythagorean ties.  Four more are needed: dy = 0 first: (+-5, 0); then
     dy**2 = 9: (+-4, -3) and (+-4, +3) tie on dx**2 too, the lower row (-3) goes first.
  """
  def grid_anchors(rows, cols):
    return np.array([[8 * x - 4, 8 * y - 4, 8 * x + 4, 8 * y + 4] for y in range(rows)
                     for x in range(cols)], F32)

  inner = {(y + 6) * 13 + x + 6 for y in range(-6, 7) for x in range(-6, 7) if x * x + y * y < 25}
  assert len(inner) == 69
  extra = {6 * 13 + 1, 6 * 13 + 11, 3 * 13 + 2, 3 * 13 + 10}  # (+-5, 0), (+-4, -3)
  cases = [(grid_anchors(4, 5), [4., 4., 20., 20.], (4, 5), 6, {6, 7, 11, 12, 5, 8}),
           (grid_anchors(13, 13), [40., 40., 56., 56.], (13, 13), 73, inner | extra)]
  for anchors, box, size, topk, expected in cases:
    gt = np.array([box], F32)
    mask, valid, counts = np.array([True]), np.ones(len(anchors), bool), (len(anchors),)
    assert set(ref_candidates(anchors, gt[0], counts, topk, valid)) == expected
    assert set(ref_candidates(anchors, gt[0], counts, topk, valid, index_ties=True)) != expected
    for sizes in (None, (size,)):
      assert candidate_sets(anchors, gt, mask, valid, counts, sizes, topk)[0] == expected


# ------------------------------------------------------------- hand-worked tie rules
# One level: a row of 3 anchors of 16x16 px centred at x = 0, 8, 16 (stride 8), y = 0; with
# topk = 3 every anchor is a candidate of every gt, so thresholds can be worked by hand.

ROW = np.array([[-8., -8., 8., 8.], [0., -8., 16., 8.], [8., -8., 24., 8.]], F32)


@functools.lru_cache(maxsize=None)
def row_fn(sizes, topk):
  if sizes is None:
    return jax.jit(functools.partial(atss_assign_dense, num_level_anchors=(3,), topk=topk))
  return jax.jit(functools.partial(atss_assign, featmap_sizes=sizes, topk=topk))


def assign_row(boxes, mask=None, topk=3):
  """Assigns ``boxes`` (up to 4, padded to 4 with garbage) on ROW with the dense and the grid
  path, checks they agree, returns numpy (gt_index, labels, max_overlap); labels = 10 + row."""
  num = len(boxes)
  gt = np.full((4, 4), np.nan, F32)
  gt[:num] = boxes
  gt_mask = np.zeros(4, bool)
  gt_mask[:num] = True if mask is None else mask
  labels = np.arange(10, 14, dtype=np.int32)
  outs = [tuple(np.asarray(x) for x in row_fn(sizes, topk)(ROW, gt, labels, gt_mask))
          for sizes in (None, ((1, 3),))]
  for a, b in zip(*outs):
    np.testing.assert_array_equal(a, b)
  return outs[0]


def test_two_gts_on_one_anchor_highest_iou_wins():
  # gt 0 = [1, -8, 17, 8]: IoUs 112/400 = .28, 240/272 = .882, 144/368 = .391;
  #   mean .518 + std .320 = .838 -> anchor 1 positive with .882 (centre 8 inside).
  # gt 1 = anchor 1 itself: IoUs 1/3, 1, 1/3 -> thr 5/9 + .385 = .94 -> anchor 1, IoU 1.
  # Anchor 1 is positive for both: gt 1 (IoU 1) wins although its row is higher.
  gt_index, labels, max_overlap = assign_row([[1., -8., 17., 8.], [0., -8., 16., 8.]])
  np.testing.assert_array_equal(gt_index, [-1, 1, -1])
  np.testing.assert_array_equal(labels, [-1, 11, -1])
  np.testing.assert_array_equal(max_overlap, [-1e8, 1., -1e8])


def test_equal_iou_lower_gt_row_wins():
  # Mirror images about anchor 1: [1, -8, 17, 8] and [-1, -8, 15, 8] both have IoU 240/272
  # with anchor 1 and the same threshold (.838); rows 2 and 0 -> row 0 wins.  Row 1 is
  # padding holding anchor 1's exact box (IoU 1): it must not take anything.
  gt_index, labels, max_overlap = assign_row(
      [[-1., -8., 15., 8.], [0., -8., 16., 8.], [1., -8., 17., 8.]], mask=[True, False, True])
  np.testing.assert_array_equal(gt_index, [-1, 0, -1])
  np.testing.assert_array_equal(labels, [-1, 10, -1])
  np.testing.assert_allclose(max_overlap[1], 240 / 272, rtol=1e-7)
  # Exact duplicates at rows 1 and 2: the lower row.
  gt_index, _, _ = assign_row([[50., 50., 60., 60.], [0., -8., 16., 8.], [0., -8., 16., 8.]],
                              mask=[False, True, True])
  np.testing.assert_array_equal(gt_index, [-1, 1, -1])


def test_centre_exactly_at_eps_is_outside():
  # gt [-8, y1, 8, 8] with y1 = -0.01: anchor 0's IoU 128.16/256 = .5006 passes the
  # threshold (.2336 mean + .252 std = .486) but its centre y = 0 is exactly float32(0.01)
  # from the top side: not "> 0.01", so not positive.  One ulp further up it is.
  eps = F32(0.01)
  gt_index, _, _ = assign_row([[-8., -eps, 8., 8.]])
  np.testing.assert_array_equal(gt_index, [-1, -1, -1])
  gt_index, _, max_overlap = assign_row([[-8., np.nextafter(-eps, F32(-1)), 8., 8.]])
  np.testing.assert_array_equal(gt_index, [0, -1, -1])
  assert 0.5 < max_overlap[0] < 0.501


def test_single_candidate_has_nan_threshold():
  # topk 1 on one level: one candidate, torch's unbiased std of one value is NaN, so nothing
  # is positive even for a gt equal to an anchor.
  gt_index, _, max_overlap = assign_row([[0., -8., 16., 8.]], topk=1)
  np.testing.assert_array_equal(gt_index, [-1, -1, -1])
  np.testing.assert_array_equal(max_overlap, [-1e8] * 3)


def test_no_gts_and_invalid_anchors():
  anchors, sizes, counts, per_loc = layout('one_per_loc')
  gt, labels, mask = random_scene(0, 5, (160, 224))
  valid = make_valid(sizes, per_loc, (100, 150))
  for grid in (False, True):
    gt_index, labels_out, max_overlap = run('one_per_loc', grid, gt, labels, np.zeros_like(mask),
                                            valid)
    np.testing.assert_array_equal(gt_index, np.where(valid, -1, -2))
    np.testing.assert_array_equal(labels_out, -1)
    np.testing.assert_array_equal(max_overlap, 0)
    gt_index, _, max_overlap = run('one_per_loc', grid, gt, labels, mask, valid)
    assert (gt_index[~valid] == -2).all() and (max_overlap[~valid] == 0).all()
    assert (gt_index[valid] >= -1).all()


def test_padding_rows_change_nothing():
  """The same gts, padded differently (other rows, other garbage), get the same anchors."""
  anchors, sizes, counts, per_loc = layout('three_per_loc')
  gt, labels, mask = random_scene(11, 9, (160, 224))
  valid = make_valid(sizes, per_loc, (160, 224))
  rows = np.flatnonzero(mask)
  moved = np.arange(len(rows)) * 3 + 1  # other rows, in the same order
  gt2 = np.tile(np.array([[0., 0., 1e4, 1e4]], F32), (PAD_GT, 1))  # garbage covering all
  gt2[moved] = gt[rows]
  labels2 = np.full(PAD_GT, 99, np.int32)
  labels2[moved] = labels[rows]
  mask2 = np.zeros(PAD_GT, bool)
  mask2[moved] = True
  for grid in (False, True):
    first = run('three_per_loc', grid, gt, labels, mask, valid)
    second = run('three_per_loc', grid, gt2, labels2, mask2, valid)
    remap = np.full(PAD_GT, -3)
    remap[rows] = moved
    np.testing.assert_array_equal(np.where(first[0] >= 0, remap[first[0]], first[0]), second[0])
    np.testing.assert_array_equal(first[1], second[1])
    np.testing.assert_array_equal(first[2], second[2])
    assert (first[0] >= 0).sum() > 0


def test_vmap_equals_per_image():
  anchors, sizes, counts, per_loc = layout('one_per_loc')
  scenes = [random_scene(s, n, (160, 224)) for s, n in ((20, 3), (21, 0), (22, 17))]
  valid = np.stack([make_valid(sizes, per_loc, hw) for hw in ((160, 224), (90, 200), (33, 60))])
  gt, labels, mask = (np.stack(x) for x in zip(*scenes))
  fn = assign_fn('one_per_loc', True)
  batched = jax.jit(jax.vmap(fn, in_axes=(None, 0, 0, 0, 0)))(anchors, gt, labels, mask, valid)
  for i in range(3):
    single = fn(anchors, gt[i], labels[i], mask[i], valid[i])
    for a, b in zip(batched, single):
      np.testing.assert_array_equal(np.asarray(a)[i], np.asarray(b))


def test_bad_arguments_raise():
  anchors, sizes, counts, _ = layout('one_per_loc')
  gt, labels, mask = random_scene(0, 2, (160, 224))
  with pytest.raises(ValueError, match='num_level_anchors'):
    atss_assign_dense(anchors, gt, labels, mask, counts[:-1])
  with pytest.raises(ValueError, match='featmap_sizes'):
    atss_assign(anchors, gt, labels, mask, sizes[:-1], num_level_anchors=counts)
  with pytest.raises(ValueError, match='do not divide'):
    atss_assign(anchors, gt, labels, mask, ((21, 28),) + sizes[1:])
  with pytest.raises(ValueError, match='featmap size'):
    atss_assign(anchors, gt, labels, mask, ((21, 28),) + sizes[1:], num_level_anchors=counts)
  with pytest.raises(ValueError, match='featmap_sizes'):
    atss_assign(anchors, gt, labels, mask, ((20, 0),) + sizes[1:])
  with pytest.raises(ValueError, match='atss_assign_dense'):
    atss_assign(anchors, gt, labels, mask)
  with pytest.raises(ValueError, match='gt_mask'):
    atss_assign(anchors, gt, labels, mask[:-1], sizes)
  with pytest.raises(ValueError, match='topk'):
    atss_assign(anchors, gt, labels, mask, sizes, topk=0)
  with pytest.raises(ValueError, match='valid'):
    atss_assign_dense(anchors, gt, labels, mask, counts, valid=np.ones(3, bool))


@pytest.mark.parametrize('name', ['one_per_loc', 'three_per_loc'])
def test_featmap_sizes_alone_equals_the_keyword_call_of_atss_head(name):
  """The level counts follow from featmap_sizes; the call atss_head makes (num_level_anchors
  and featmap_sizes as keywords) gives the same; only-counts falls back to the dense path
  with a warning."""
  anchors, sizes, counts, per_loc = layout(name)
  gt, labels, mask = random_scene(3, 12, LAYOUTS[name][0])
  valid = make_valid(sizes, per_loc, (100, 150))
  new = atss_assign(anchors, gt, labels, mask, sizes, valid=valid)
  old = atss_assign(anchors, gt, labels, mask, num_level_anchors=counts, topk=9, valid=valid,
                    featmap_sizes=sizes)
  with pytest.warns(UserWarning, match='dense path'):
    fallback = atss_assign(anchors, gt, labels, mask, num_level_anchors=counts, valid=valid)
  dense = atss_assign_dense(anchors, gt, labels, mask, counts, valid=valid)
  assert (np.asarray(new.gt_index) >= 0).sum() > 0
  for out in (old, fallback, dense):
    for a, b in zip(new, out):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
