"""Losses against direct numpy (float64) formulas written here, plus gradient edge cases."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdet import losses as L

EPS32 = float(np.finfo(np.float32).eps)


def np_sigmoid(x):
  return np.exp(-np.logaddexp(0, -x))


def np_softplus(x):
  return np.logaddexp(0, x)


def np_focal(x, t, alpha=0.25, gamma=2.0):
  """Naive focal loss as written in the paper / mmdetection's py_sigmoid_focal_loss."""
  p = np_sigmoid(x)
  ce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
  pt = (1 - p) * t + p * (1 - t)
  return ce * (alpha * t + (1 - alpha) * (1 - t)) * pt**gamma


def np_focal_stable(x, t, alpha=0.25, gamma=2.0):
  """The same in float64 with the log-sum-exp form of BCE (valid for any logit)."""
  ce = np_softplus(x) - t * x
  pt = t * np_sigmoid(-x) + (1 - t) * np_sigmoid(x)
  return ce * (alpha * t + (1 - alpha) * (1 - t)) * pt**gamma


def onehot(labels, num):
  return (labels[:, None] == np.arange(num)).astype(np.float64)


def num_grad(f, x, h=1e-4):
  g = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    d = np.zeros_like(x)
    d[i] = h
    g[i] = (f(x + d) - f(x - d)) / (2 * h)
  return g


# ---------------------------------------------------------------------------- focal


def test_focal_matches_naive_formula():
  rng = np.random.default_rng(0)
  x = rng.normal(0, 3, (40, 7)).astype(np.float32)
  labels = rng.integers(-1, 8, 40)  # -1 and 7 (= C) are background
  want = np_focal(x.astype(np.float64), onehot(labels, 7))
  got = L.sigmoid_focal_loss(x, labels, reduction="none")
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=1e-7)
  got_onehot = L.sigmoid_focal_loss(x, onehot(labels, 7).astype(np.float32), reduction="none")
  np.testing.assert_allclose(np.asarray(got_onehot), want, rtol=2e-5, atol=1e-7)
  # alpha / gamma are used as given.
  got = L.sigmoid_focal_loss(x, labels, alpha=0.6, gamma=1.5, reduction="none")
  np.testing.assert_allclose(np.asarray(got), np_focal(x.astype(np.float64), onehot(labels, 7),
                                                       0.6, 1.5), rtol=2e-5, atol=1e-7)


def test_focal_reductions_and_weights():
  rng = np.random.default_rng(1)
  x = rng.normal(0, 2, (12, 3)).astype(np.float32)
  labels = rng.integers(-1, 3, 12)
  w_row = (rng.random(12) > 0.3).astype(np.float32)
  w_el = rng.random((12, 3)).astype(np.float32)
  el = np_focal(x.astype(np.float64), onehot(labels, 3))
  f = functools.partial(L.sigmoid_focal_loss, x, labels)
  np.testing.assert_allclose(f(reduction="sum"), el.sum(), rtol=1e-5)
  np.testing.assert_allclose(f(reduction="mean"), el.mean(), rtol=1e-5)
  np.testing.assert_allclose(f(w_row, reduction="sum"), (el * w_row[:, None]).sum(), rtol=1e-5)
  np.testing.assert_allclose(f(w_el, reduction="sum"), (el * w_el).sum(), rtol=1e-5)
  np.testing.assert_allclose(f(w_row, avg_factor=5.0), (el * w_row[:, None]).sum() / (5 + EPS32),
                             rtol=1e-5)
  np.testing.assert_allclose(f(w_row, reduction="none"), el * w_row[:, None], rtol=2e-5,
                             atol=1e-7)


@pytest.mark.parametrize("big", [100.0, 1000.0])
def test_focal_stable_at_extreme_logits(big):
  x = np.array([[big, -big, 0.5], [-big, big, -big]], np.float32)
  labels = np.array([0, 2])
  t = onehot(labels, 3)
  got = np.asarray(L.sigmoid_focal_loss(x, labels, reduction="none"))
  want = np_focal_stable(x.astype(np.float64), t)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # By hand: a confident wrong logit costs alpha * |x| (positive) or (1 - alpha) * |x|.
  np.testing.assert_allclose(got[0, :2], [0.0, 0.0], atol=1e-6)
  np.testing.assert_allclose(got[1], [0.0, 0.75 * big, 0.25 * big], rtol=1e-6)
  grad = np.asarray(jax.jit(jax.grad(
      lambda v: L.sigmoid_focal_loss(v, labels, reduction="sum")))(x))
  assert np.isfinite(grad).all()
  want_grad = num_grad(lambda v: np_focal_stable(v, t).sum(), x.astype(np.float64))
  np.testing.assert_allclose(grad, want_grad, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.6, 1.5), (0.25, 0.0)])
def test_focal_int_labels_gradient_equals_float_target_autodiff(alpha, gamma):
  """The int-label path's closed-form gradient (binary_focal_loss) against autodiff of the
  float-target formula and a float64 central difference, logits exactly 0 included."""
  rng = np.random.default_rng(3)
  x = rng.normal(0, 4, (30, 5)).astype(np.float32)
  x[:4] = 0.0
  labels = rng.integers(-1, 6, 30)
  w = rng.random(30).astype(np.float32)
  loss = lambda t: (lambda v: L.sigmoid_focal_loss(v, t, w, alpha=alpha, gamma=gamma,
                                                   avg_factor=7.0))
  got = jax.jit(jax.grad(loss(labels)))(x)
  want = jax.jit(jax.grad(loss(onehot(labels, 5).astype(np.float32))))(x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=1e-8)
  t = onehot(labels, 5)
  numeric = num_grad(lambda v: (np_focal_stable(v, t, alpha, gamma) * w[:, None]).sum() / 7.0,
                     x.astype(np.float64), h=1e-6)
  np.testing.assert_allclose(np.asarray(got), numeric, rtol=1e-4, atol=1e-7)


def test_focal_all_background_and_grad():
  x = jnp.zeros((5, 4))
  labels = jnp.full((5,), -1)
  loss, grad = jax.jit(jax.value_and_grad(
      lambda v: L.sigmoid_focal_loss(v, labels, jnp.zeros(5), avg_factor=0.)))(x)
  assert float(loss) == 0.0 and np.isfinite(np.asarray(grad)).all()
  # Without weights, all-background logits 0: every element costs 0.75 * log 2 * 0.25.
  np.testing.assert_allclose(L.sigmoid_focal_loss(x, labels), 0.75 * np.log(2) * 0.25, rtol=1e-6)


# ------------------------------------------------------------------------------ bce


def test_binary_cross_entropy_with_logits():
  rng = np.random.default_rng(2)
  x = np.concatenate([rng.normal(0, 4, 30), [100., -100., 0.]]).astype(np.float32)
  t = np.concatenate([rng.random(30), [0., 1., 0.5]]).astype(np.float32)
  want = np_softplus(x.astype(np.float64)) - t * x  # = -(t log p + (1 - t) log(1 - p))
  got = L.binary_cross_entropy_with_logits(x, t, reduction="none")
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  mask = (rng.random(33) > 0.5).astype(np.float32)
  np.testing.assert_allclose(
      L.binary_cross_entropy_with_logits(x, t, mask, avg_factor=mask.sum()),
      (want * mask).sum() / (mask.sum() + EPS32), rtol=1e-5)
  grad = jax.jit(jax.grad(
      lambda v: L.binary_cross_entropy_with_logits(v, t, reduction="sum")))(x)
  np.testing.assert_allclose(np.asarray(grad), np_sigmoid(x.astype(np.float64)) - t,
                             rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------- cross entropy


def np_ce(logits, labels):
  logits = logits.astype(np.float64)
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  return lse - logits[np.arange(len(labels)), labels]


def test_cross_entropy_plain_and_class_weighted():
  rng = np.random.default_rng(3)
  logits = rng.normal(0, 3, (50, 6)).astype(np.float32)
  labels = rng.integers(0, 6, 50)
  ce = np_ce(logits, labels)
  np.testing.assert_allclose(L.cross_entropy(logits, labels), ce.mean(), rtol=1e-5)
  np.testing.assert_allclose(L.cross_entropy(logits, labels, reduction="none"), ce, rtol=1e-5)
  # DETR: 5 classes weight 1, no-object (index 5) weight 0.1; PyTorch's weighted mean.
  cw = np.array([1, 1, 1, 1, 1, 0.1], np.float32)
  w = cw[labels].astype(np.float64)
  want = (w * ce).sum() / w.sum()
  np.testing.assert_allclose(L.cross_entropy(logits, labels, class_weight=cw), want, rtol=1e-5)
  # ... which is mmdetection's avg_factor num_pos + 0.1 * num_neg.
  num_pos, num_neg = (labels < 5).sum(), (labels == 5).sum()
  np.testing.assert_allclose(
      L.cross_entropy(logits, labels, class_weight=cw, avg_factor=num_pos + 0.1 * num_neg),
      want, rtol=1e-5)
  np.testing.assert_allclose(L.cross_entropy(logits, labels, class_weight=cw, reduction="sum"),
                             (w * ce).sum(), rtol=1e-5)


def test_cross_entropy_ignored_labels_and_weights():
  rng = np.random.default_rng(4)
  logits = rng.normal(0, 1, (20, 4)).astype(np.float32)
  labels = rng.integers(-1, 4, 20)
  weights = rng.random(20).astype(np.float32)
  keep = labels >= 0
  ce = np_ce(logits[keep], labels[keep])
  cw = np.array([0.5, 1., 2., 0.1], np.float32)
  w = cw[labels[keep]] * weights[keep]
  np.testing.assert_allclose(L.cross_entropy(logits, labels, weights, class_weight=cw),
                             (w * ce).sum() / w.sum(), rtol=1e-5)
  got = np.asarray(L.cross_entropy(logits, labels, reduction="none"))
  np.testing.assert_allclose(got[keep], ce, rtol=1e-5)
  assert (got[~keep] == 0).all()
  # Nothing to average: 0, not NaN, with finite gradients.
  val, grad = jax.jit(jax.value_and_grad(lambda v: L.cross_entropy(v, np.full(20, -1))))(logits)
  assert float(val) == 0.0 and np.isfinite(np.asarray(grad)).all()


# ------------------------------------------------------------------------ SSD mining


def np_ssd_mining(logits, labels, weights=None, ratio=3):
  """mmdetection's SSDHead.loss_by_feat_single, as a loop: all positives + top negatives."""
  num_classes = logits.shape[1] - 1
  targets = np.where((labels >= 0) & (labels < num_classes), labels, num_classes)
  ce = np_ce(logits, targets)
  if weights is not None:
    ce = ce * weights
  pos = [i for i in range(len(labels)) if 0 <= labels[i] < num_classes]
  neg = [i for i in range(len(labels)) if i not in pos]
  num_neg = min(ratio * len(pos), len(neg))
  neg_losses = sorted((ce[i] for i in neg), reverse=True)[:num_neg]
  chosen = set(pos) | set(sorted(neg, key=lambda i: -ce[i])[:num_neg])
  return sum(ce[i] for i in pos) + sum(neg_losses), chosen


@pytest.fixture(scope="module")
def ssd_batched():
  fn = lambda lg, lb, w: L.ssd_hard_negative_ce(lg, lb, w)  # noqa: E731
  return jax.jit(jax.vmap(fn))


def make_ssd_case(rng, num_anchors, num_classes, num_pos, background=None, ties=False):
  logits = rng.normal(0, 2, (num_anchors, num_classes + 1)).astype(np.float32)
  if ties:  # many identical rows -> identical losses
    logits[::2] = logits[0]
  labels = np.full(num_anchors, num_classes if background is None else background)
  pos = rng.choice(num_anchors, num_pos, replace=False)
  labels[pos] = rng.integers(0, num_classes, num_pos)
  weights = (rng.random(num_anchors) > 0.1).astype(np.float32)
  weights[pos] = 1
  return logits, labels, weights


def test_ssd_hard_negative_mining_matches_loop(ssd_batched):
  rng = np.random.default_rng(5)
  cases = [make_ssd_case(rng, 60, 4, n, background=bg, ties=ties)
           for n, bg, ties in [(0, None, False), (1, None, False), (5, -1, False), (14, None, True),
                               (20, None, False), (45, -1, False), (60, None, False),
                               (3, None, True)]]
  logits, labels, weights = (np.stack(c) for c in zip(*cases))
  got = np.asarray(ssd_batched(logits, labels, weights))
  for g, (lg, lb, w) in zip(got, cases):
    want, _ = np_ssd_mining(lg, lb, w)
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)
  assert got[0] == 0.0  # no positives, no negatives mined


def test_ssd_gradient_only_on_mined_anchors():
  rng = np.random.default_rng(6)
  logits, labels, _ = make_ssd_case(rng, 40, 3, 6)
  grad = np.asarray(jax.jit(jax.grad(
      lambda v: L.ssd_hard_negative_ce(v, labels, avg_factor=6.)))(logits))
  _, chosen = np_ssd_mining(logits, labels)
  assert len(chosen) == 6 + 18
  targets = np.where(labels < 3, labels, 3)
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  want = np.zeros_like(p)
  for i in chosen:
    want[i] = (p[i] - onehot(targets[i:i + 1], 4)[0]) / 6
  np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-6)
  # And without positives: zero, finite gradients.
  grad = jax.jit(jax.grad(lambda v: L.ssd_hard_negative_ce(v, np.full(40, 3))))(logits)
  assert np.isfinite(np.asarray(grad)).all() and not np.asarray(grad).any()


# ------------------------------------------------------------------------ box losses


def np_iou_giou(a, b, eps):
  out_iou, out_giou = [], []
  for p, t in zip(a.astype(np.float64), b.astype(np.float64)):
    iw = max(min(p[2], t[2]) - max(p[0], t[0]), 0)
    ih = max(min(p[3], t[3]) - max(p[1], t[1]), 0)
    inter = iw * ih
    union = max((p[2] - p[0]) * (p[3] - p[1]) + (t[2] - t[0]) * (t[3] - t[1]) - inter, eps)
    ew = max(max(p[2], t[2]) - min(p[0], t[0]), 0)
    eh = max(max(p[3], t[3]) - min(p[1], t[1]), 0)
    enclose = max(ew * eh, eps)
    out_iou.append(inter / union)
    out_giou.append(inter / union - (enclose - union) / enclose)
  return np.array(out_iou), np.array(out_giou)


def random_boxes(rng, n, degenerate=0):
  xy = rng.uniform(0, 50, (n, 2))
  wh = rng.uniform(1, 30, (n, 2))
  wh[:degenerate] = 0
  return np.concatenate([xy, xy + wh], -1).astype(np.float32)


EDGE_PRED = np.array([[0, 0, 0, 0], [5, 5, 5, 9], [0, 0, 10, 10], [1, 1, 1, 1], [0, 0, 2, 2]],
                     np.float32)
EDGE_TARGET = np.array([[0, 0, 10, 10], [5, 5, 8, 9], [20, 20, 30, 30], [1, 1, 1, 1],
                        [0, 0, 2, 2]], np.float32)


@pytest.mark.parametrize("mode", ["log", "linear", "square"])
def test_iou_loss(mode):
  rng = np.random.default_rng(7)
  pred, target = random_boxes(rng, 30, 2), random_boxes(rng, 30)
  pred[5:10] = target[5:10] + rng.normal(0, 2, (5, 4)).astype(np.float32)  # overlapping
  iou = np.maximum(np_iou_giou(pred, target, 1e-6)[0], 1e-6)
  want = {"log": -np.log(iou), "linear": 1 - iou, "square": 1 - iou**2}[mode]
  got = L.iou_loss(pred, target, mode=mode, reduction="none")
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  w = rng.random(30).astype(np.float32)
  np.testing.assert_allclose(L.iou_loss(pred, target, w, mode=mode, avg_factor=w.sum()),
                             (want * w).sum() / (w.sum() + EPS32), rtol=1e-5)
  w4 = rng.random((30, 4)).astype(np.float32)  # (N, 4) weights are averaged per box
  np.testing.assert_allclose(L.iou_loss(pred, target, w4, mode=mode, reduction="sum"),
                             (want * w4.mean(1)).sum(), rtol=1e-5)


def test_giou_loss():
  rng = np.random.default_rng(8)
  pred, target = random_boxes(rng, 30, 2), random_boxes(rng, 30)
  pred[5:10] = target[5:10] + rng.normal(0, 2, (5, 4)).astype(np.float32)
  want = 1 - np_iou_giou(pred, target, 1e-7)[1]
  got = L.giou_loss(pred, target, reduction="none")
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(L.giou_loss(pred, target), want.mean(), rtol=1e-5)


def test_box_losses_edge_cases_finite():
  # Zero-area boxes, disjoint boxes, identical degenerate boxes.
  iou_want = -np.log(np.maximum(np_iou_giou(EDGE_PRED, EDGE_TARGET, 1e-6)[0], 1e-6))
  np.testing.assert_allclose(L.iou_loss(EDGE_PRED, EDGE_TARGET, reduction="none"), iou_want,
                             rtol=1e-5)
  giou_want = 1 - np_iou_giou(EDGE_PRED, EDGE_TARGET, 1e-7)[1]
  np.testing.assert_allclose(L.giou_loss(EDGE_PRED, EDGE_TARGET, reduction="none"), giou_want,
                             rtol=1e-5, atol=1e-6)
  def all_losses(p):  # one compiled function: value and gradient of every box loss
    zero = jnp.zeros(5)
    return jnp.stack([L.iou_loss(p, EDGE_TARGET, reduction="sum"),
                      L.giou_loss(p, EDGE_TARGET, reduction="sum"),
                      L.l1_loss(p, EDGE_TARGET, reduction="sum"),
                      L.smooth_l1_loss(p, EDGE_TARGET, reduction="sum"),
                      # no positives (all weights 0): exactly 0, as mmdetection
                      L.iou_loss(p, EDGE_TARGET, zero, avg_factor=0.),
                      L.giou_loss(p, EDGE_TARGET, zero, avg_factor=0.)])
  values, jac = jax.jit(lambda p: (all_losses(p), jax.jacrev(all_losses)(p)))(EDGE_PRED)
  assert np.isfinite(np.asarray(jac)).all()
  assert np.isfinite(np.asarray(values)).all() and (np.asarray(values)[4:] == 0).all()


def test_l1_and_smooth_l1():
  rng = np.random.default_rng(9)
  pred = rng.normal(0, 2, (25, 4)).astype(np.float32)
  target = rng.normal(0, 2, (25, 4)).astype(np.float32)
  diff = np.abs(pred.astype(np.float64) - target)
  w = (rng.random(25) > 0.5).astype(np.float32)
  np.testing.assert_allclose(L.l1_loss(pred, target, reduction="none"), diff, rtol=1e-5)
  np.testing.assert_allclose(L.l1_loss(pred, target, w, avg_factor=4 * w.sum()),
                             (diff * w[:, None]).sum() / (4 * w.sum() + EPS32), rtol=1e-5)
  for beta in (1.0, 0.5, 1 / 9):
    want = np.where(diff < beta, 0.5 * diff**2 / beta, diff - 0.5 * beta)
    np.testing.assert_allclose(L.smooth_l1_loss(pred, target, beta=beta, reduction="none"), want,
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(L.smooth_l1_loss(pred, target, w, beta=beta, reduction="sum"),
                               (want * w[:, None]).sum(), rtol=1e-5)


def test_centerness_target():
  rng = np.random.default_rng(10)
  ltrb = rng.uniform(0.1, 50, (40, 4)).astype(np.float32)
  ltrb[:5, 0] = 0.0  # on the left side
  ltrb[5:8, 2] = -3.0  # outside
  ltrb[8] = 0.0
  l, t, r, b = ltrb.astype(np.float64).T
  with np.errstate(invalid="ignore", divide="ignore"):
    want = np.sqrt(np.minimum(l, r) / np.maximum(l, r) * np.minimum(t, b) / np.maximum(t, b))
  want[:9] = 0.0
  np.testing.assert_allclose(np.asarray(L.centerness_target(ltrb)), want, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(L.centerness_target(np.array([4., 2., 4., 2.])), 1.0)
  np.testing.assert_allclose(L.centerness_target(np.array([1., 2., 3., 8.])), np.sqrt(1 / 12),
                             rtol=1e-6)
  grad = jax.jit(jax.grad(lambda v: L.centerness_target(v).sum()))(ltrb)
  assert np.isfinite(np.asarray(grad)).all()


# -------------------------------------------------------------------------- errors


@pytest.mark.parametrize("call", [
    lambda: L.l1_loss(np.zeros(3), np.zeros(3), reduction="avg"),
    lambda: L.l1_loss(np.zeros(3), np.zeros(3), reduction="sum", avg_factor=2.),
    lambda: L.l1_loss(np.zeros(3), np.zeros(4)),
    lambda: L.l1_loss(np.zeros((3, 4)), np.zeros((3, 4)), np.ones(4)),  # rows, not columns
    lambda: L.smooth_l1_loss(np.zeros(3), np.zeros(3), beta=0.),
    lambda: L.iou_loss(np.zeros((3, 4)), np.zeros((3, 4)), mode="exp"),
    lambda: L.iou_loss(np.zeros((3, 4)), np.zeros((3, 4)), np.ones(4)),
    lambda: L.sigmoid_focal_loss(np.zeros((3, 4)), np.zeros(4, np.int32)),
    lambda: L.cross_entropy(np.zeros((3, 4)), np.zeros(3, np.int32), class_weight=np.ones(3)),
    lambda: L.cross_entropy(np.zeros((3, 4)), np.zeros(3, np.float32)),
    lambda: L.ssd_hard_negative_ce(np.zeros((2, 3, 4)), np.zeros((2, 3), np.int32)),
])
def test_bad_arguments_raise_value_error(call):
  with pytest.raises(ValueError):
    call()

