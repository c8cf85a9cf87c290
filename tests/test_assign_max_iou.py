"""max_iou_assign against a slow numpy reference that follows mmdetection's MaxIoUAssigner step
by step (its per-gt loop included), and hand-worked cases for every tie and threshold rule.

Exact float equality is the CPU's (where the suite runs): on GPU, XLA's float32 division is not
correctly rounded, so IoUs there may differ from numpy's / torch's by an ulp or two."""
import functools

import jax
import numpy as np
import pytest

from jaxdet.assigners.max_iou import max_iou_assign

RETINANET = dict(pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.)
SSD = dict(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0., gt_max_assign_all=False)
SETTINGS = {
    'retinanet': RETINANET,
    'ssd': SSD,
    'tuple_neg_min_pos': dict(pos_iou_thr=0.6, neg_iou_thr=(0.1, 0.4), min_pos_iou=0.3),
    'no_low_quality': dict(pos_iou_thr=0.5, neg_iou_thr=0.4, match_low_quality=False),
}


# ----------------------------------------------------------------------------- reference
def ref_iou(gts, priors):
  """(g, n) IoU in float32 with mmdetection's bbox_overlaps operation order."""
  area1 = (gts[:, 2] - gts[:, 0]) * (gts[:, 3] - gts[:, 1])
  area2 = (priors[:, 2] - priors[:, 0]) * (priors[:, 3] - priors[:, 1])
  lt = np.maximum(gts[:, None, :2], priors[None, :, :2])
  rb = np.minimum(gts[:, None, 2:], priors[None, :, 2:])
  wh = np.clip(rb - lt, 0, None)
  overlap = wh[..., 0] * wh[..., 1]
  union = np.maximum(area1[:, None] + area2[None, :] - overlap, np.float32(1e-6))
  return overlap / union


def ref_max_iou(anchors, gt_boxes, gt_labels, gt_mask, valid, *, pos_iou_thr, neg_iou_thr,
                min_pos_iou=0., gt_max_assign_all=True, match_low_quality=True):
  """mmdetection's MaxIoUAssigner.assign on the real gts and the valid priors, mapped back."""
  anchor_ids, gt_ids = np.flatnonzero(valid), np.flatnonzero(gt_mask)
  priors, gts = anchors[anchor_ids], gt_boxes[gt_ids]
  n, g = len(priors), len(gts)
  assigned = np.full(n, -1)  # mmdetection's gt_inds: -1 ignore, 0 background, k -> gt k - 1
  max_overlaps = np.zeros(n, np.float32)
  if g == 0:
    assigned[:] = 0
  elif n > 0:
    overlaps = ref_iou(gts, priors)
    max_overlaps, argmax = overlaps.max(0), overlaps.argmax(0)
    gt_max, gt_argmax = overlaps.max(1), overlaps.argmax(1)
    lo, hi = neg_iou_thr if isinstance(neg_iou_thr, tuple) else (0., neg_iou_thr)
    assigned[(max_overlaps >= lo) & (max_overlaps < hi)] = 0
    pos = max_overlaps >= pos_iou_thr
    assigned[pos] = argmax[pos] + 1
    if match_low_quality:
      for i in range(g):
        if gt_max[i] >= min_pos_iou:
          if gt_max_assign_all:
            assigned[overlaps[i] == gt_max[i]] = i + 1
          else:
            assigned[gt_argmax[i]] = i + 1
  gt_index = np.full(len(anchors), -2)
  for a, k in zip(anchor_ids, assigned):
    gt_index[a] = gt_ids[k - 1] if k > 0 else (-1 if k == 0 else -2)
  labels = np.where(gt_index >= 0, gt_labels[np.maximum(gt_index, 0)], -1)
  overlap_out = np.zeros(len(anchors), np.float32)
  overlap_out[anchor_ids] = max_overlaps
  return gt_index, labels, overlap_out


# ----------------------------------------------------------------------------- scenes
def retina_like_anchors(height, width, strides=(8, 16)):
  """RetinaNet-style anchors (3 scales x 3 ratios per location), built in numpy."""
  out = []
  for stride in strides:
    sizes = [(stride * 4 * 2**(k / 3) * np.sqrt(1 / r), stride * 4 * 2**(k / 3) * np.sqrt(r))
             for r in (0.5, 1., 2.) for k in range(3)]
    ys, xs = np.meshgrid(np.arange(0, height, stride), np.arange(0, width, stride),
                         indexing='ij')
    for cy, cx in zip(ys.ravel(), xs.ravel()):
      for w, h in sizes:
        out.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
  return np.asarray(out, np.float32)


def random_scene(rng, height, width, num_slots, max_real):
  """Gts padded with garbage rows: integer coordinates (exact IoUs, so ties; duplicates too)
  or real-valued ones (rounded IoUs, where a fused multiply-add would show)."""
  n = rng.integers(0, max_real + 1)
  xy = rng.integers(0, [width - 4, height - 4], size=(n, 2))
  wh = rng.integers(6, [width // 2, height // 2], size=(n, 2))
  boxes = np.concatenate([xy, np.minimum(xy + wh, [width, height])], 1).astype(np.float32)
  if rng.random() < 0.5:
    boxes = (boxes + rng.uniform(-3, 3, boxes.shape)).astype(np.float32)
  if n >= 2 and rng.random() < 0.7:
    boxes[-1] = boxes[0]  # an exact duplicate: every anchor ties between the two
  slots = np.sort(rng.choice(num_slots, size=n, replace=False))
  gt_boxes = rng.normal(0, 1e4, (num_slots, 4)).astype(np.float32)
  gt_boxes[rng.random(num_slots) < 0.3] = np.nan
  gt_labels = rng.integers(-5, 1000, num_slots).astype(np.int32)
  gt_mask = np.zeros(num_slots, bool)
  gt_boxes[slots], gt_labels[slots], gt_mask[slots] = boxes, rng.integers(0, 5, n), True
  return gt_boxes, gt_labels, gt_mask


@functools.lru_cache(maxsize=None)
def batched_assign(setting):
  def fn(anchors, gt_boxes, gt_labels, gt_mask, valid):
    return max_iou_assign(anchors, gt_boxes, gt_labels, gt_mask, valid=valid,
                          **SETTINGS[setting])
  return jax.jit(jax.vmap(fn, in_axes=(None, 0, 0, 0, 0)))


@pytest.mark.parametrize('setting', sorted(SETTINGS))
def test_random_padded_scenes_equal_reference(setting):
  rng = np.random.default_rng(sorted(SETTINGS).index(setting))
  height, width, num_slots, batch = 128, 160, 8, 12
  anchors = retina_like_anchors(height, width)
  scenes = [random_scene(rng, height, width, num_slots, max_real=6) for _ in range(batch)]
  gt_boxes, gt_labels, gt_mask = (np.stack(x) for x in zip(*scenes))
  valid = rng.random((batch, len(anchors))) < 0.8
  valid[: batch // 2] = True
  out = batched_assign(setting)(anchors, gt_boxes, gt_labels, gt_mask, valid)
  num_positive = num_overwritten = 0
  for b in range(batch):
    want = ref_max_iou(anchors, gt_boxes[b], gt_labels[b], gt_mask[b], valid[b],
                       **SETTINGS[setting])
    np.testing.assert_array_equal(np.asarray(out.gt_index[b]), want[0])
    np.testing.assert_array_equal(np.asarray(out.labels[b]), want[1])
    np.testing.assert_array_equal(np.asarray(out.max_overlap[b]), want[2])
    num_positive += (want[0] >= 0).sum()
    first_max = np.nanargmax(np.where(gt_mask[b], ref_iou(anchors, gt_boxes[b]), -1), axis=1)
    num_overwritten += ((want[0] >= 0) & (want[0] != first_max)).sum()
  # The scenes exercise positives and, with low-quality matching, step 4's overwrites.
  assert num_positive > 5 * batch
  assert num_overwritten > 0 or not SETTINGS[setting].get('match_low_quality', True)
  print(setting, num_positive, num_overwritten)


# ----------------------------------------------------------------------------- hand-worked
FAR = [100., 100., 110., 110.]  # an anchor that overlaps none of the gts below


_jit_assign = jax.jit(max_iou_assign, static_argnames=(
    'pos_iou_thr', 'neg_iou_thr', 'min_pos_iou', 'gt_max_assign_all', 'match_low_quality'))


def assign(anchors, gts, labels=None, mask=None, valid=None, **kw):
  """Runs one hand-worked case, padded to 4 anchors (invalid) and 4 gts (garbage, masked)."""
  num_anchors, num_gts = len(anchors), len(gts)
  anchors = np.concatenate([np.asarray(anchors, np.float32),
                            np.tile(np.float32([[0., 0., 10., 10.]]), (4 - num_anchors, 1))])
  valid = np.ones(num_anchors, bool) if valid is None else valid
  valid = np.concatenate([valid, np.zeros(4 - num_anchors, bool)])
  gts = np.concatenate([np.asarray(gts, np.float32),
                        np.tile(np.float32([[0., 0., 10., 10.]]), (4 - num_gts, 1))])
  labels = np.arange(num_gts) + 10 if labels is None else labels
  labels = np.concatenate([labels, np.full(4 - num_gts, 99)]).astype(np.int32)
  mask = np.ones(num_gts, bool) if mask is None else np.asarray(mask)
  mask = np.concatenate([mask, np.zeros(4 - num_gts, bool)])
  out = _jit_assign(anchors, gts, labels, mask, valid=valid, **kw)
  return tuple(np.asarray(x)[:num_anchors] for x in out)


def test_anchor_best_for_two_gts_goes_to_the_later_gt():
  # IoU(a0, gt0) = 100 / 200 = 0.5 = IoU(a0, gt2): step 3 picks gt0 (first max), step 4's loop
  # then gives a0 to gt0 and overwrites it with gt2. Row 1 is padding.
  anchors = [[0., 0., 10., 10.], FAR]
  gts = [[0., 0., 10., 20.], [0., 0., 10., 10.], [0., -10., 10., 10.]]
  gt_index, labels, max_overlap = assign(anchors, gts, mask=[True, False, True], **RETINANET)
  np.testing.assert_array_equal(gt_index, [2, -1])
  np.testing.assert_array_equal(labels, [12, -1])
  np.testing.assert_array_equal(max_overlap, [0.5, 0.])
  # Without low-quality matching the positive keeps its first max.
  gt_index, _, _ = assign(anchors, gts, mask=[True, False, True], match_low_quality=False,
                          pos_iou_thr=0.5, neg_iou_thr=0.4)
  np.testing.assert_array_equal(gt_index, [0, -1])


def test_low_quality_match_overwrites_a_better_positive():
  # mmdetection's own example: a0 has IoU 0.9 with gt0 and 0.8 with gt1, and is gt1's best
  # anchor, so it ends with gt1 (gt0 is left without an anchor).
  anchors = [[0., 0., 10., 10.], FAR]
  gts = [[0., 0., 10., 9.], [0., 0., 10., 12.5]]
  gt_index, labels, max_overlap = assign(anchors, gts, **RETINANET)
  np.testing.assert_array_equal(gt_index, [1, -1])
  np.testing.assert_array_equal(labels, [11, -1])
  np.testing.assert_allclose(max_overlap, [0.9, 0.], rtol=1e-7)


def test_gt_max_assign_all_takes_every_tied_anchor_else_the_first():
  # IoU(a0, gt) = IoU(a1, gt) = 0.5, between neg 0.3 and pos 0.6: only step 4 makes them positive.
  anchors = [[0., 0., 10., 20.], [0., -10., 10., 10.], FAR]
  gts = [[0., 0., 10., 10.]]
  kw = dict(pos_iou_thr=0.6, neg_iou_thr=0.3)
  np.testing.assert_array_equal(assign(anchors, gts, **kw)[0], [0, 0, -1])
  np.testing.assert_array_equal(assign(anchors, gts, gt_max_assign_all=False, **kw)[0],
                                [0, -2, -1])
  np.testing.assert_array_equal(assign(anchors, gts, match_low_quality=False, **kw)[0],
                                [-2, -2, -1])
  # min_pos_iou above the gt's best IoU: no low-quality match.
  np.testing.assert_array_equal(assign(anchors, gts, min_pos_iou=0.51, **kw)[0], [-2, -2, -1])
  np.testing.assert_array_equal(assign(anchors, gts, min_pos_iou=0.5, **kw)[0], [0, 0, -1])


def test_threshold_boundaries():
  # IoU exactly 0.5 (100 / 200) is positive; exactly 0.4 (40 / 100) is not < 0.4: ignored.
  anchors = [[0., 0., 10., 20.], [0., 0., 10., 10.], FAR]
  gts = [[0., 0., 10., 10.], [0., 100., 10., 104.]]
  anchors[2] = [0., 100., 10., 110.]  # IoU 0.4 with gt1
  kw = dict(pos_iou_thr=0.5, neg_iou_thr=0.4, match_low_quality=False)
  gt_index, _, max_overlap = assign(anchors, gts, **kw)
  np.testing.assert_array_equal(max_overlap, np.float32([0.5, 1., 0.4]))
  np.testing.assert_array_equal(gt_index, [0, 0, -2])
  # A tuple range: [0.45, 0.6) is background; 0.4 is outside it, 1.0 is above pos.
  gt_index, _, _ = assign(anchors, gts, pos_iou_thr=0.7, neg_iou_thr=(0.45, 0.6),
                          match_low_quality=False)
  np.testing.assert_array_equal(gt_index, [-1, 0, -2])
  # SSD: pos == neg, so nothing is ignored.
  gt_index, _, _ = assign(anchors, gts, pos_iou_thr=0.4, neg_iou_thr=0.4,
                          match_low_quality=False)
  np.testing.assert_array_equal(gt_index, [0, 0, 1])


def test_no_gt_invalid_anchors_and_padding():
  anchors = [[0., 0., 10., 10.], [5., 5., 20., 20.], FAR]
  # No real gt (the padded row overlaps a0 perfectly and must not count): all background.
  gt_index, labels, max_overlap = assign(anchors, [[0., 0., 10., 10.]], mask=[False],
                                         valid=np.array([True, False, True]), **RETINANET)
  np.testing.assert_array_equal(gt_index, [-1, -2, -1])
  np.testing.assert_array_equal(labels, [-1, -1, -1])
  np.testing.assert_array_equal(max_overlap, [0., 0., 0.])
  # An invalid anchor is never a candidate: gt's best valid anchor is a1, not a0.
  gt_index, _, max_overlap = assign(anchors, [[0., 0., 10., 10.]],
                                    valid=np.array([False, True, True]), **RETINANET)
  np.testing.assert_array_equal(gt_index, [-2, 0, -1])
  np.testing.assert_array_equal(max_overlap, [0., np.float32(25) / np.float32(300), 0.])
  # No valid anchor at all: everything ignored.
  gt_index, _, _ = assign(anchors, [[0., 0., 10., 10.]], valid=np.zeros(3, bool), **RETINANET)
  np.testing.assert_array_equal(gt_index, [-2, -2, -2])


def test_gt_overlapping_nothing_takes_all_zero_iou_anchors_as_mmdetection():
  # mmdetection's quirk with min_pos_iou = 0: the gt's best IoU is 0 and every anchor at 0
  # "reaches" it. (A real gt that overlaps some anchor never triggers this.)
  anchors = [[0., 0., 10., 10.], FAR]
  gt_index, _, _ = assign(anchors, [[50., 50., 60., 60.]], **RETINANET)
  np.testing.assert_array_equal(gt_index, [0, 0])
  gt_index, _, _ = assign(anchors, [[50., 50., 60., 60.]], **SSD)
  np.testing.assert_array_equal(gt_index, [0, -1])


def test_bad_arguments_raise_value_error():
  anchors, gts = np.zeros((3, 4), np.float32), np.zeros((2, 4), np.float32)
  labels, mask = np.zeros(2, np.int32), np.ones(2, bool)
  with pytest.raises(ValueError, match='anchors'):
    max_iou_assign(anchors[:, :3], gts, labels, mask, **RETINANET)
  with pytest.raises(ValueError, match='gt_mask'):
    max_iou_assign(anchors, gts, labels, mask[:1], **RETINANET)
  with pytest.raises(ValueError, match='valid'):
    max_iou_assign(anchors, gts, labels, mask, valid=np.ones(2, bool), **RETINANET)
  with pytest.raises(ValueError, match='neg_iou_thr'):
    max_iou_assign(anchors, gts, labels, mask, pos_iou_thr=0.5, neg_iou_thr=(0.1, 0.2, 0.3))
