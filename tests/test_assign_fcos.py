"""fcos_assign against a per-point numpy loop that follows the FCOS rules as mmdetection writes
them, and hand-worked cases for the tie, range-boundary and centre-sampling rules."""
import functools

import jax
import numpy as np
import pytest

from jaxdet.assigners.fcos import fcos_assign

F32 = np.float32


# ----------------------------------------------------------------------------- reference
def ref_fcos(points, gt_boxes, gt_labels, gt_mask, *, num_level_points, strides, regress_ranges,
             center_sampling=False, center_sample_radius=1.5, norm_on_bbox=False):
  """One point at a time, one real gt at a time; the smallest area wins, the first on ties."""
  levels = np.repeat(np.arange(len(num_level_points)), num_level_points)
  num_points = len(points)
  gt_index = np.full(num_points, -1)
  targets = np.zeros((num_points, 4), F32)
  centerness = np.zeros(num_points, F32)
  for p, (x, y) in enumerate(points):
    stride, (lo, hi) = strides[levels[p]], regress_ranges[levels[p]]
    best, best_area = -1, None
    for g in np.flatnonzero(gt_mask):
      x1, y1, x2, y2 = gt_boxes[g]
      dist = [x - x1, y - y1, x2 - x, y2 - y]
      if center_sampling:
        cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, F32(stride * center_sample_radius)
        box = [max(cx - r, x1), max(cy - r, y1), min(cx + r, x2), min(cy + r, y2)]
        inside = min(x - box[0], y - box[1], box[2] - x, box[3] - y) > 0
      else:
        inside = min(dist) > 0
      in_range = F32(lo) <= max(dist) <= F32(hi)
      area = (x2 - x1) * (y2 - y1)
      if inside and in_range and (best < 0 or area < best_area):
        best, best_area = g, area
    if best >= 0:
      x1, y1, x2, y2 = gt_boxes[best]
      l, t, r, b = x - x1, y - y1, x2 - x, y2 - y
      gt_index[p] = best
      targets[p] = np.array([l, t, r, b], F32) / (F32(stride) if norm_on_bbox else F32(1))
      l, t, r, b = targets[p]
      centerness[p] = np.sqrt((min(l, r) / max(l, r)) * (min(t, b) / max(t, b)))
  labels = np.where(gt_index >= 0, gt_labels[np.maximum(gt_index, 0)], -1)
  return gt_index, labels, targets, centerness


def point_grid(height, width, strides):
  """mmdetection's MlvlPointGenerator (offset 0.5), in numpy: levels, then rows, then columns."""
  out, counts = [], []
  for s in strides:
    h, w = -(-height // s), -(-width // s)
    ys, xs = np.meshgrid((np.arange(h) + 0.5) * s, (np.arange(w) + 0.5) * s, indexing='ij')
    out.append(np.stack([xs.ravel(), ys.ravel()], 1))
    counts.append(h * w)
  return np.concatenate(out).astype(F32), tuple(counts)


def random_scene(rng, height, width, num_slots, max_real):
  """Gts on a half-pixel lattice (points sit on it too: boundary ties happen) or real-valued,
  with equal-area pairs, padded with garbage rows."""
  n = rng.integers(0, max_real + 1)
  xy = rng.integers(0, [2 * width - 8, 2 * height - 8], size=(n, 2)) / 2
  wh = rng.integers(4, [width, height], size=(n, 2)) / 2
  boxes = np.concatenate([xy, np.minimum(xy + wh, [width, height])], 1).astype(F32)
  if rng.random() < 0.3:
    boxes = (boxes + rng.uniform(-1, 1, boxes.shape)).astype(F32)
  if n >= 2:
    boxes[-1] = boxes[0] + np.float32([4, 4, 4, 4])  # same area, overlapping: an area tie
  slots = np.sort(rng.choice(num_slots, size=n, replace=False))
  gt_boxes = rng.normal(0, 1e3, (num_slots, 4)).astype(F32)
  gt_boxes[rng.random(num_slots) < 0.3] = np.nan
  gt_labels = rng.integers(-5, 1000, num_slots).astype(np.int32)
  gt_mask = np.zeros(num_slots, bool)
  gt_boxes[slots], gt_labels[slots], gt_mask[slots] = boxes, rng.integers(0, 5, n), True
  return gt_boxes, gt_labels, gt_mask


STRIDES = (4, 8, 16)
RANGES = ((-1, 16), (16, 32), (32, 1e8))  # scaled to a 128 x 96 image so every level is used
SETTINGS = {
    'plain': dict(),
    'center_sampling': dict(center_sampling=True),
    'center_sampling_r1_norm': dict(center_sampling=True, center_sample_radius=1.,
                                    norm_on_bbox=True),
}


@functools.lru_cache(maxsize=None)
def batched_fcos(setting, num_level_points):
  def fn(points, gt_boxes, gt_labels, gt_mask):
    return fcos_assign(points, gt_boxes, gt_labels, gt_mask, num_level_points=num_level_points,
                       strides=STRIDES, regress_ranges=RANGES, **SETTINGS[setting])
  return jax.jit(jax.vmap(fn, in_axes=(None, 0, 0, 0)))


@pytest.mark.parametrize('setting', sorted(SETTINGS))
def test_random_padded_scenes_equal_reference(setting):
  rng = np.random.default_rng(sorted(SETTINGS).index(setting))
  height, width, num_slots, batch = 96, 128, 8, 10
  points, counts = point_grid(height, width, STRIDES)
  scenes = [random_scene(rng, height, width, num_slots, max_real=8) for _ in range(batch)]
  gt_boxes, gt_labels, gt_mask = (np.stack(x) for x in zip(*scenes))
  out = batched_fcos(setting, counts)(points, gt_boxes, gt_labels, gt_mask)
  num_positive = 0
  for b in range(batch):
    want = ref_fcos(points, gt_boxes[b], gt_labels[b], gt_mask[b], num_level_points=counts,
                    strides=STRIDES, regress_ranges=RANGES, **SETTINGS[setting])
    np.testing.assert_array_equal(np.asarray(out.gt_index[b]), want[0])
    np.testing.assert_array_equal(np.asarray(out.labels[b]), want[1])
    np.testing.assert_array_equal(np.asarray(out.bbox_targets[b]), want[2])
    np.testing.assert_allclose(np.asarray(out.centerness_targets[b]), want[3], rtol=1e-6)
    num_positive += (want[0] >= 0).sum()
  print(setting, num_positive)
  assert num_positive > 5 * batch


# ----------------------------------------------------------------------------- hand-worked
_jit_fcos = jax.jit(fcos_assign, static_argnames=(
    'num_level_points', 'strides', 'regress_ranges', 'center_sampling', 'center_sample_radius',
    'norm_on_bbox'))


def assign(points, gts, mask=None, **kw):
  """One hand-worked case, its gts padded to 4 rows with a masked box that covers everything."""
  num_gts = len(gts)
  gts = np.concatenate([np.asarray(gts, F32).reshape(-1, 4),
                        np.tile(F32([[-1e3, -1e3, 1e3, 1e3]]), (4 - num_gts, 1))])
  mask = np.ones(num_gts, bool) if mask is None else np.asarray(mask)
  mask = np.concatenate([mask, np.zeros(4 - num_gts, bool)])
  labels = (np.arange(4) + 10).astype(np.int32)
  kw.setdefault('num_level_points', (len(points),))
  kw.setdefault('strides', (8,))
  kw.setdefault('regress_ranges', ((-1, 1e8),))
  return _jit_fcos(np.asarray(points, F32), gts, labels, mask, **kw)


def test_equal_areas_take_the_first_gt_smaller_area_wins():
  point = [[5., 5.]]
  a, b = [0., 0., 10., 10.], [2., 2., 12., 12.]  # equal areas, both contain the point
  np.testing.assert_array_equal(assign(point, [a, b]).gt_index, [0])
  np.testing.assert_array_equal(assign(point, [b, a]).gt_index, [0])
  small = [4., 4., 10., 10.]
  out = assign(point, [a, small])
  np.testing.assert_array_equal(out.gt_index, [1])
  np.testing.assert_array_equal(out.labels, [11])
  np.testing.assert_array_equal(out.bbox_targets, [[1., 1., 5., 5.]])
  # A masked gt is never chosen, however small.
  np.testing.assert_array_equal(assign(point, [a, small], mask=[True, False]).gt_index, [0])


def test_point_on_the_border_is_outside():
  # min(l, t, r, b) > 0 is strict: a point on the gt's edge is background.
  out = assign([[5., 5.], [5., 6.]], [[5., 0., 15., 10.]])
  np.testing.assert_array_equal(out.gt_index, [-1, -1])
  out = assign([[5.5, 5.]], [[5., 0., 15., 10.]])
  np.testing.assert_array_equal(out.gt_index, [0])


def test_regress_range_bounds_are_inclusive():
  # The same location on two levels with ranges [-1, 10] and [10, 20]; l, t, r, b = 5, 5, r, 3.
  kw = dict(num_level_points=(1, 1), strides=(8, 16), regress_ranges=((-1, 10), (10, 20)))
  points = [[5., 5.], [5., 5.]]
  for right_edge, want in ((15., [0, 0]), (15.5, [-1, 0]), (25., [-1, 0]), (25.5, [-1, -1]),
                           (14.5, [0, -1])):
    out = assign(points, [[0., 0., right_edge, 8.]], **kw)
    np.testing.assert_array_equal(out.gt_index, want, err_msg=f'x2 = {right_edge}')


def test_center_sampling_radius_and_clipping():
  # stride 8, radius 1.5: the centre region of [0, 0, 100, 100] is (38, 62) in x and y, open.
  big = [[0., 0., 100., 100.]]
  points = [[38., 50.], [38.5, 50.], [61.5, 50.], [62., 50.], [50., 38.], [50., 61.9]]
  out = assign(points, big, center_sampling=True)
  np.testing.assert_array_equal(out.gt_index, [-1, 0, 0, -1, -1, 0])
  # Same points, radius 1 (8 px): only the centre survives... none of these.
  out = assign(points, big, center_sampling=True, center_sample_radius=1.)
  np.testing.assert_array_equal(out.gt_index, [-1] * 6)
  # A gt smaller than the region: the region is clipped to the gt.
  small = [[45., 45., 55., 55.]]
  out = assign([[44.5, 50.], [45., 50.], [45.5, 50.], [54.5, 50.], [55., 50.]], small,
               center_sampling=True)
  np.testing.assert_array_equal(out.gt_index, [-1, -1, 0, 0, -1])
  # The region follows the level's stride: on a stride-16 level radius 1.5 is 24 px.
  out = assign([[30., 50.], [27., 50.]], big, center_sampling=True, strides=(16,))
  np.testing.assert_array_equal(out.gt_index, [0, 0])
  out = assign([[26., 50.]], big, center_sampling=True, strides=(16,))
  np.testing.assert_array_equal(out.gt_index, [-1])


def test_targets_centerness_and_norm_on_bbox():
  point, gt = [[5., 5.]], [[0., 0., 15., 8.]]  # l, t, r, b = 5, 5, 10, 3
  out = assign(point, gt)
  np.testing.assert_array_equal(out.bbox_targets, [[5., 5., 10., 3.]])
  np.testing.assert_allclose(out.centerness_targets, [np.sqrt(5 / 10 * 3 / 5)], rtol=1e-6)
  out = assign(point, gt, norm_on_bbox=True)
  np.testing.assert_array_equal(out.bbox_targets, [[5 / 8, 5 / 8, 10 / 8, 3 / 8]])
  np.testing.assert_allclose(out.centerness_targets, [np.sqrt(0.3)], rtol=1e-6)
  # Background: zeros, no NaN.
  out = assign([[50., 50.]], gt)
  np.testing.assert_array_equal(out.labels, [-1])
  np.testing.assert_array_equal(out.bbox_targets, [[0., 0., 0., 0.]])
  np.testing.assert_array_equal(out.centerness_targets, [0.])


def test_no_gt_is_all_background():
  out = assign([[5., 5.], [20., 20.]], np.zeros((0, 4)))
  np.testing.assert_array_equal(out.gt_index, [-1, -1])
  np.testing.assert_array_equal(out.labels, [-1, -1])
  np.testing.assert_array_equal(out.bbox_targets, np.zeros((2, 4)))


def test_bad_arguments_raise_value_error():
  points, gts = np.zeros((3, 2), F32), np.zeros((2, 4), F32)
  labels, mask = np.zeros(2, np.int32), np.ones(2, bool)
  kw = dict(strides=(8,), regress_ranges=((-1, 64),))
  with pytest.raises(ValueError, match='num_level_points'):
    fcos_assign(points, gts, labels, mask, num_level_points=(2,), **kw)
  with pytest.raises(ValueError, match='strides'):
    fcos_assign(points, gts, labels, mask, num_level_points=(3,), strides=(8, 16),
                regress_ranges=((-1, 64),))
  with pytest.raises(ValueError, match='regress_ranges'):
    fcos_assign(points, gts, labels, mask, num_level_points=(3,), strides=(8,),
                regress_ranges=((-1, 64), (64, 128)))
  with pytest.raises(ValueError, match='points'):
    fcos_assign(points[:, :1], gts, labels, mask, num_level_points=(3,), **kw)
  with pytest.raises(ValueError, match='gt_labels'):
    fcos_assign(points, gts, labels[:1], mask, num_level_points=(3,), **kw)
