"""hungarian_match (every method) against scipy.optimize.linear_sum_assignment on the valid
columns, and detr_match_cost against DETR's formula written out in numpy.

Scipy's float64 optimum is the oracle: totals are compared for every case, indices only where
the optimum is unique by construction. Few shapes, so few compiled programs: the device solver's
while loops take seconds to compile on the shared CPU.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from jaxdet.assigners.hungarian import detr_match_cost, hungarian_match

METHODS = ('device', 'host')  # 'auto' is 'device' (test_auto_is_device)
BATCH = 24  # cases per bank: every case below for one (N, M)


def jitted(method, vmapped=False):
  fn = lambda c, m: hungarian_match(c, m, method=method)
  return jax.jit(jax.vmap(fn) if vmapped else fn)


MATCH = {m: jitted(m) for m in METHODS}  # one jit per method: compiled once per shape
VMAPPED = {m: jitted(m, vmapped=True) for m in METHODS}


def f32_tolerance(cost, col_mask):
  """What the float32 device solver keeps (hungarian_device.py): a total within 4 float32 ulps of
  the largest valid |cost| per matched pair of scipy's float64 optimum; exact on integer costs
  (float32 sums of integers below 2**24 are exact). Measured: 0 in 1,536 random problems."""
  valid = cost[:, col_mask].astype(np.float64)
  if not valid.size or np.all(valid == np.round(valid)):
    return 0.
  pairs = min(cost.shape[0], col_mask.sum())
  return 4 * np.finfo(np.float32).eps * np.abs(valid).max() * pairs


def check_optimal(cost, col_mask, row_to_col, col_to_row, want_rows=None):
  """A valid matching of min(N, valid) pairs whose total equals scipy's on the valid columns."""
  row_to_col, col_to_row = np.asarray(row_to_col), np.asarray(col_to_row)
  num_rows, num_cols = cost.shape
  assert row_to_col.shape == (num_rows,) and col_to_row.shape == (num_cols,)
  assert row_to_col.dtype == np.int32 and col_to_row.dtype == np.int32
  valid_cols = np.flatnonzero(col_mask)
  matched = np.flatnonzero(row_to_col >= 0)
  assert len(matched) == min(num_rows, len(valid_cols))
  assert np.all(col_mask[row_to_col[matched]])  # only valid columns
  assert len(set(row_to_col[matched])) == len(matched)  # each column at most once
  expected_col_to_row = np.full(num_cols, -1)
  expected_col_to_row[row_to_col[matched]] = matched
  np.testing.assert_array_equal(col_to_row, expected_col_to_row)  # the two views agree
  total = cost[matched, row_to_col[matched]].astype(np.float64).sum()
  want = 0.
  if len(valid_cols):
    rows, cols = linear_sum_assignment(cost[:, valid_cols].astype(np.float64))
    want = cost[:, valid_cols][rows, cols].astype(np.float64).sum()
  assert abs(total - want) <= f32_tolerance(cost, col_mask), (total, want)
  if want_rows is not None:  # a unique optimum: the indices too
    np.testing.assert_array_equal(col_to_row, want_rows)


def case_bank(num_rows, num_cols, seed):
  """BATCH named (cost, col_mask, garbage cost, unique col_to_row or None) cases of one shape.

  ``garbage`` is ``cost`` with anything in the padded columns (NaN, -1e30, +inf): what the
  matcher is given; ``cost`` is what the oracle sees (finite everywhere)."""
  rng = np.random.default_rng(seed)
  n, m = num_rows, num_cols
  normal = lambda scale=1.: rng.normal(0, scale, (n, m))
  some = lambda: rng.random(m) < rng.uniform(0.3, 1.)
  everything = np.ones(m, bool)
  cases = {
      'random': (normal(), some()),
      'negative': (rng.uniform(-1e4, -1e3, (n, m)), some()),
      'mixed sign': (normal(1e3), some()),
      'integer ties': (rng.integers(0, 3, (n, m)), everything),
      'integer ties, masked': (rng.integers(0, 3, (n, m)), some()),
      'all equal': (np.ones((n, m)), everything),
      'all equal, masked': (np.full((n, m), -2.), some()),
      'duplicated rows': (np.repeat(rng.normal(size=(1, m)), n, 0), everything),
      'duplicated columns': (np.repeat(rng.normal(size=(n, 1)), m, 1), some()),
      'duplicated rows and columns': (np.tile(rng.integers(0, 4, (2, 3)), (n, m))[:n, :m],
                                      everything),
      'more valid columns than rows': (normal(), np.arange(m) < n + 2),
      'fewer valid columns than rows': (normal(), np.isin(np.arange(m), [1, m - 2])),
      'zero valid columns': (normal(), np.zeros(m, bool)),
      'one valid column': (normal(), np.arange(m) == m - 1),
      'one valid column, garbage -1e30': (normal(), np.arange(m) == 0),
      '1e6 large': (1e6 + rng.integers(0, 1000, (n, m)), some()),
      '1e-6 scale': (normal(1e-6), everything),
      'float32 wide range': (rng.uniform(-1e3, 1e3, (n, m)) * rng.uniform(0, 1, (n, 1)), some()),
      'padding at the end': (normal(), np.arange(m) < m // 2),
      'padding +inf': (normal(), some()),
  }
  out = [(name, np.float32(c), mask, None) for name, (c, mask) in cases.items()]
  # Unique optima 1e-6 apart at 1: pairs of sigma cost 1 - 1e-6, all others 1 + 1e-6 * (0..5).
  for k in range(BATCH - len(out)):
    mask = some() if k % 2 else everything
    cost = np.float32(1 + 1e-6 * rng.integers(0, 6, (n, m)))
    valid = rng.permutation(np.flatnonzero(mask))
    pairs = min(n, len(valid))
    want = np.full(m, -1, np.int32)
    want[valid[:pairs]] = rng.permutation(n)[:pairs]
    cost[want[valid[:pairs]], valid[:pairs]] = np.float32(1 - 1e-6)
    out.append((f'unique 1e-6 apart {k}', cost, mask, want))
  fills = {'one valid column, garbage -1e30': -1e30, 'padding +inf': np.inf}
  return [(name, cost, mask, np.where(mask, cost, np.float32(fills.get(name, np.nan))), want)
          for name, cost, mask, want in out]


def stack(bank):
  return (np.stack([c[3] for c in bank]), np.stack([c[2] for c in bank]))


def check_bank(bank, method, row_to_col, col_to_row):
  row_to_col = np.asarray(row_to_col).reshape(len(bank), -1)
  col_to_row = np.asarray(col_to_row).reshape(len(bank), -1)
  for b, (name, cost, mask, _, want) in enumerate(bank):
    try:
      check_optimal(cost, mask, row_to_col[b], col_to_row[b], want)
    except AssertionError as e:
      raise AssertionError(f'{method} {name}: {e}') from e


@pytest.mark.parametrize('method', METHODS)
def test_every_case_batched_and_vmapped_equals_scipy(method):
  """More columns than rows (N = 6, M = 9): one batch axis, then the same problems under vmap
  (results identical problem by problem). More rows than columns (9, 6): two batch axes."""
  bank = case_bank(6, 9, seed=6)
  garbage, masks = stack(bank)
  batched = MATCH[method](garbage, masks)
  check_bank(bank, method, *batched)
  half = BATCH // 2
  nested = VMAPPED[method](garbage.reshape(2, half, 6, 9), masks.reshape(2, half, 9))
  for got, want in zip(nested, batched):
    np.testing.assert_array_equal(np.asarray(got).reshape(want.shape), want)
  bank = case_bank(9, 6, seed=9)
  garbage, masks = stack(bank)
  row_to_col, col_to_row = MATCH[method](garbage.reshape(2, half, 9, 6), masks.reshape(2, half, 6))
  assert row_to_col.shape == (2, half, 9) and col_to_row.shape == (2, half, 6)
  check_bank(bank, method, row_to_col, col_to_row)


@pytest.mark.parametrize('method', METHODS)
def test_unbatched(method):
  bank = case_bank(9, 6, seed=10)  # the unbatched (9, 6) program also serves the DETR test below
  for name, cost, mask, garbage, want in bank:
    try:
      check_optimal(cost, mask, *MATCH[method](garbage, mask), want)
    except AssertionError as e:
      raise AssertionError(f'{method} {name}: {e}') from e


def test_broadcast_mask_and_no_mask():
  """Shared by every method (before the solver): tested on the host method, cheap to compile."""
  bank = case_bank(9, 6, seed=11)
  cost = np.stack([c[1] for c in bank[:6]]).reshape(2, 3, 9, 6)
  mask = bank[0][2]
  host = jax.jit(lambda c, m: hungarian_match(c, m, method='host'))
  row_to_col, col_to_row = host(cost, mask)  # one (M,) mask for all
  assert row_to_col.shape == (2, 3, 9) and col_to_row.shape == (2, 3, 6)
  for idx in np.ndindex(2, 3):
    check_optimal(cost[idx], mask, row_to_col[idx], col_to_row[idx])
  row_to_col, col_to_row = host(cost, mask[None])  # (1, M)
  for idx in np.ndindex(2, 3):
    check_optimal(cost[idx], mask, row_to_col[idx], col_to_row[idx])
  masks = np.stack([c[2] for c in bank[:3]])  # DETR: (images, M) for (layers, images, N, M)
  row_to_col, col_to_row = host(cost, masks)
  for idx in np.ndindex(2, 3):
    check_optimal(cost[idx], masks[idx[1]], row_to_col[idx], col_to_row[idx])
  check_optimal(cost[0, 0], np.ones(6, bool), *host(cost[0, 0], None))


def test_auto_is_device():
  """The default traces to the very program of method='device' (so it shares its tests)."""
  cost, mask = np.zeros((2, 9, 6), np.float32), np.ones((2, 6), bool)
  trace = lambda method: str(jax.make_jaxpr(
      lambda c, m: hungarian_match(c, m, method=method))(cost, mask))
  assert trace('auto') == trace('device') != trace('host')
  assert str(jax.make_jaxpr(hungarian_match)(cost, mask)) == trace('device')


def test_hand_worked():  # 'device': the unique optima of the banks
  match = MATCH['host']
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


@pytest.mark.parametrize('method', METHODS)
def test_no_gradient_through_matching(method):
  """The loss's gradient is the indicator of the matched pairs: the matching is a constant."""
  rng = np.random.default_rng(3)
  cost, mask = np.float32(rng.normal(size=(9, 6))), np.arange(6) < 4

  def matched_cost(c):
    row_to_col, _ = hungarian_match(c, mask, method=method)
    return jnp.where(row_to_col >= 0, jnp.take_along_axis(
        c, jnp.maximum(row_to_col, 0)[:, None], 1)[:, 0], 0.).sum()

  grad = np.asarray(jax.jit(jax.grad(matched_cost))(cost))
  row_to_col = np.asarray(MATCH[method](cost, mask)[0])  # test_unbatched's compiled program
  want = np.zeros_like(cost)
  want[np.flatnonzero(row_to_col >= 0), row_to_col[row_to_col >= 0]] = 1.
  np.testing.assert_array_equal(grad, want)


def test_host_is_one_callback_for_every_axis(monkeypatch):
  """vmap of a batched call still calls scipy's loop once, with every problem."""
  import jaxdet.assigners.hungarian as hungarian_module
  calls = []
  scipy_batch = hungarian_module._scipy_match_columns
  monkeypatch.setattr(hungarian_module, '_scipy_match_columns',
                      lambda c, m: calls.append(c.shape) or scipy_batch(c, m))
  rng = np.random.default_rng(5)
  cost, mask = np.float32(rng.normal(size=(3, 2, 5, 4))), rng.random((3, 2, 4)) < 0.7
  fn = jax.jit(jax.vmap(lambda c, m: hungarian_match(c, m, method='host')))
  row_to_col, col_to_row = fn(cost, mask)
  assert len(calls) == 1 and np.prod(calls[0][:-2]) == 6
  for idx in np.ndindex(3, 2):
    check_optimal(cost[idx], mask[idx], row_to_col[idx], col_to_row[idx])


@pytest.mark.parametrize('method', ('host',))  # the callback; 'device' is plain XLA
def test_pmap(method):
  """The host callback inside pmap (one process, every local CPU device)."""
  rng = np.random.default_rng(4)
  n = jax.local_device_count()
  cost, mask = np.float32(rng.normal(size=(n, 2, 9, 6))), rng.random((n, 2, 6)) < 0.7
  row_to_col, col_to_row = jax.pmap(lambda c, m: hungarian_match(c, m, method=method))(cost, mask)
  for idx in np.ndindex(n, 2):
    check_optimal(cost[idx], mask[idx], row_to_col[idx], col_to_row[idx])


def test_empty_and_bad_inputs():
  for method in METHODS + ('auto',):
    row_to_col, col_to_row = hungarian_match(np.zeros((2, 3, 0), np.float32), method=method)
    np.testing.assert_array_equal(row_to_col, -np.ones((2, 3)))
    assert col_to_row.shape == (2, 0)
    row_to_col, col_to_row = hungarian_match(np.zeros((0, 4), np.float32), method=method)
    assert row_to_col.shape == (0,) and col_to_row.shape == (4,)
  with pytest.raises(ValueError, match='cost'):
    hungarian_match(np.zeros(3, np.float32))
  with pytest.raises(ValueError, match='col_mask'):
    hungarian_match(np.zeros((2, 3), np.float32), np.ones(2, bool))
  with pytest.raises(ValueError, match='col_mask'):
    hungarian_match(np.zeros((4, 2, 3), np.float32), np.ones((3, 3), bool))
  with pytest.raises(ValueError, match='method'):
    hungarian_match(np.zeros((2, 3), np.float32), method='optax')


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
  for method in METHODS:
    check_optimal(cost, mask, *MATCH[method](cost, mask))
