"""hungarian_match against scipy.optimize.linear_sum_assignment on the valid columns, and
detr_match_cost against DETR's formula written out in numpy."""

import jax
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from jaxdet.assigners.hungarian import detr_match_cost, hungarian_match

# Compiled once per shape and shared: the while loops of the solver take ~1.5 s to compile.
match = jax.jit(hungarian_match)
batched_match = jax.jit(jax.vmap(hungarian_match))


def check_optimal(cost, col_mask, row_to_col, col_to_row):
  """A valid matching of min(N, valid) pairs whose total equals scipy's on the valid columns."""
  row_to_col, col_to_row = np.asarray(row_to_col), np.asarray(col_to_row)
  num_rows, num_cols = cost.shape
  valid_cols = np.flatnonzero(col_mask)
  matched = np.flatnonzero(row_to_col >= 0)
  assert len(matched) == min(num_rows, len(valid_cols))
  assert np.all(col_mask[row_to_col[matched]])  # only valid columns
  assert len(set(row_to_col[matched])) == len(matched)  # each column at most once
  expected_col_to_row = np.full(num_cols, -1)
  expected_col_to_row[row_to_col[matched]] = matched
  np.testing.assert_array_equal(col_to_row, expected_col_to_row)  # the two views agree
  total = cost[matched, row_to_col[matched]].astype(np.float64).sum()
  if len(valid_cols):
    rows, cols = linear_sum_assignment(cost[:, valid_cols].astype(np.float64))
    want = cost[:, valid_cols][rows, cols].astype(np.float64).sum()
  else:
    want = 0.
  np.testing.assert_allclose(total, want, rtol=1e-5, atol=1e-4)


def random_masks(rng, batch, num_cols):
  masks = rng.random((batch, num_cols)) < rng.uniform(0.2, 1., (batch, 1))
  masks[0], masks[1] = True, False  # unpadded, all padded
  masks[2, : num_cols // 2], masks[2, num_cols // 2:] = True, False  # padding at the end
  return masks


@pytest.mark.parametrize('shape', [(6, 9), (9, 6), (7, 7)])
def test_random_costs_with_masks_equal_scipy(shape):
  rng = np.random.default_rng(shape[0] * 100 + shape[1])
  batch = 12
  cost = rng.normal(0, 3, (batch,) + shape).astype(np.float32)
  cost[3:6] = rng.integers(0, 3, (3,) + shape)  # many ties
  cost[6:8] = rng.uniform(1e3, 1e4, (2,) + shape)  # large positive costs
  cost[8:10] = rng.uniform(-1e4, -1e3, (2,) + shape)  # all negative (DETR costs can be)
  masks = random_masks(rng, batch, shape[1])
  garbage = np.where(masks[:, None, :], cost, np.float32(np.nan))
  garbage[10][:, ~masks[10]] = -1e30  # padding that would win if it counted
  for b in range(batch):
    check_optimal(cost[b], masks[b], *match(garbage[b], masks[b]))


def test_vmap_equals_per_item_and_no_mask_means_all_valid():
  rng = np.random.default_rng(0)
  cost = rng.normal(size=(6, 6, 9)).astype(np.float32)
  masks = random_masks(rng, 6, 9)
  batched = batched_match(cost, masks)
  for b in range(6):
    one = match(cost[b], masks[b])
    np.testing.assert_array_equal(batched[0][b], one[0])
    np.testing.assert_array_equal(batched[1][b], one[1])
    check_optimal(cost[b], masks[b], batched[0][b], batched[1][b])
  unmasked = match(cost[0])
  np.testing.assert_array_equal(unmasked[0], batched[0][0])  # masks[0] is all True


def test_hand_worked():
  # Row 0 prefers column 1 (cost 0) but column 1 is padding: it must take column 2.
  cost = np.float32([[5., 0., 1.], [2., 0., 9.]])
  row_to_col, col_to_row = match(cost, np.array([True, False, True]))
  np.testing.assert_array_equal(row_to_col, [2, 0])
  np.testing.assert_array_equal(col_to_row, [1, -1, 0])
  # Without the mask: 0 -> 2, 1 -> 1 costs 1, the unique optimum.
  row_to_col, col_to_row = match(cost, np.ones(3, bool))
  np.testing.assert_array_equal(row_to_col, [2, 1])
  np.testing.assert_array_equal(col_to_row, [-1, 1, 0])
  # More rows than valid columns: the one valid column takes its cheapest row, others get -1.
  row_to_col, col_to_row = match(cost.T, np.array([True, False]))
  np.testing.assert_array_equal(row_to_col, [-1, 0, -1])
  np.testing.assert_array_equal(col_to_row, [1, -1])


def test_empty_and_bad_shapes():
  row_to_col, col_to_row = hungarian_match(np.zeros((3, 0), np.float32))
  np.testing.assert_array_equal(row_to_col, [-1, -1, -1])
  assert col_to_row.shape == (0,)
  with pytest.raises(ValueError, match='cost'):
    hungarian_match(np.zeros(3, np.float32))
  with pytest.raises(ValueError, match='col_mask'):
    hungarian_match(np.zeros((2, 3), np.float32), np.ones(2, bool))


# ----------------------------------------------------------------------------- DETR cost
def ref_detr_cost(logits, pred, labels, gt, class_weight=1., bbox_weight=5., giou_weight=2.):
  """DETR's HungarianMatcher cost, one (query, gt) pair at a time in float64."""
  logits, pred, gt = (np.asarray(x, np.float64) for x in (logits, pred, gt))
  prob = np.exp(logits - logits.max(-1, keepdims=True))
  prob /= prob.sum(-1, keepdims=True)
  xyxy = lambda b: np.array([b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2])
  out = np.zeros((len(pred), len(gt)))
  for q in range(len(pred)):
    for g in range(len(gt)):
      a, b = xyxy(pred[q]), xyxy(gt[g])
      inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
      area_a, area_b = (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
      union = area_a + area_b - inter
      enclose = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
      giou = inter / union - (enclose - union) / enclose
      out[q, g] = (bbox_weight * np.abs(pred[q] - gt[g]).sum() - class_weight * prob[q, labels[g]]
                   - giou_weight * giou)
  return out


def random_cxcywh(rng, n):
  wh = rng.uniform(0.05, 0.5, (n, 2))
  cxcy = rng.uniform(wh / 2, 1 - wh / 2)
  return np.concatenate([cxcy, wh], 1).astype(np.float32)


def test_detr_match_cost_equals_formula_and_matches_scipy():
  rng = np.random.default_rng(1)
  num_queries, num_classes, num_gts = 9, 4, 6
  logits = rng.normal(0, 2, (num_queries, num_classes + 1)).astype(np.float32)
  pred, gt = random_cxcywh(rng, num_queries), random_cxcywh(rng, num_gts)
  gt[1] = pred[3]  # identical boxes: GIoU 1, L1 0
  labels = rng.integers(0, num_classes, num_gts).astype(np.int32)
  cost = np.asarray(jax.jit(detr_match_cost)(logits, pred, labels, gt))
  np.testing.assert_allclose(cost, ref_detr_cost(logits, pred, labels, gt), rtol=1e-5, atol=1e-5)
  weighted = jax.jit(detr_match_cost)(logits, pred, labels, gt, class_weight=2., bbox_weight=1.,
                             giou_weight=0.5)
  np.testing.assert_allclose(weighted, ref_detr_cost(logits, pred, labels, gt, 2., 1., 0.5),
                             rtol=1e-5, atol=1e-5)
  mask = np.array([True, True, False, True, False, True])
  check_optimal(cost, mask, *match(cost, mask))
