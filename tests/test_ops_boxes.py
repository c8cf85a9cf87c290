"""jaxdet.ops.boxes against pycocotools and direct numpy formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from jaxdet.ops.boxes import (box_area, box_cxcywh_to_xyxy, box_iof, box_iou, box_iou_aligned,
                              box_xyxy_to_cxcywh, clip_boxes, generalized_box_iou,
                              generalized_box_iou_aligned)

M, N = 7, 9


def random_boxes(rng, n, *, size=60.0):
  """Boxes clustered in a small canvas so that many pairs overlap."""
  xy = rng.uniform(0, size, (n, 2))
  wh = rng.uniform(1.0, size / 2, (n, 2))
  return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def np_inter(a, b):
  w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  return w * h


def np_area(a):
  return (a[2] - a[0]) * (a[3] - a[1])


def np_iou(a, b):
  inter = np_inter(a, b)
  return inter / max(np_area(a) + np_area(b) - inter, 1e-6)


def np_giou(a, b):
  inter = np_inter(a, b)
  union = max(np_area(a) + np_area(b) - inter, 1e-6)
  enclose = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
  enclose = max(enclose, 1e-6)
  return inter / union - (enclose - union) / enclose


def pairwise(fn, a, b):
  a = a.astype(np.float64)
  b = b.astype(np.float64)
  return np.array([[fn(x, y) for y in b] for x in a])


@pytest.fixture(scope="module")
def pair_fns():
  return {name: jax.jit(fn) for name, fn in [
      ("iou", box_iou), ("iof", box_iof), ("giou", generalized_box_iou),
      ("iou_aligned", box_iou_aligned), ("giou_aligned", generalized_box_iou_aligned)]}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_box_iou_matches_pycocotools(pair_fns, seed):
  rng = np.random.default_rng(seed)
  a, b = random_boxes(rng, M), random_boxes(rng, N)
  to_xywh = lambda x: np.concatenate([x[:, :2], x[:, 2:] - x[:, :2]], 1).astype(np.float64)
  expected = mask_utils.iou(to_xywh(a), to_xywh(b), np.zeros(N, np.uint8))
  got = np.asarray(pair_fns["iou"](a, b))
  assert got.shape == (M, N)
  assert (expected > 0).sum() > 5  # the scene really has overlaps
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_pairwise_ops_match_numpy_formulas(pair_fns):
  rng = np.random.default_rng(3)
  a, b = random_boxes(rng, M), random_boxes(rng, N)
  np.testing.assert_allclose(pair_fns["iof"](a, b),
                             pairwise(lambda x, y: np_inter(x, y) / np_area(x), a, b),
                             rtol=1e-5, atol=1e-6)
  giou = pairwise(np_giou, a, b)
  assert (giou < 0).any()
  np.testing.assert_allclose(pair_fns["giou"](a, b), giou, rtol=1e-5, atol=1e-6)


def test_aligned_ops_match_numpy_formulas(pair_fns):
  rng = np.random.default_rng(4)
  a, b = random_boxes(rng, N), random_boxes(rng, N)
  b[:3] = a[:3] + rng.uniform(-3, 3, (3, 4)).astype(np.float32)  # some large overlaps
  np.testing.assert_allclose(pair_fns["iou_aligned"](a, b),
                             [np_iou(x, y) for x, y in zip(a.astype(float), b.astype(float))],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(pair_fns["giou_aligned"](a, b),
                             [np_giou(x, y) for x, y in zip(a.astype(float), b.astype(float))],
                             rtol=1e-5, atol=1e-6)


def test_leading_dims_broadcast():
  rng = np.random.default_rng(5)
  a = np.stack([random_boxes(rng, M) for _ in range(2)])
  b = np.stack([random_boxes(rng, N) for _ in range(2)])
  got = np.asarray(box_iou(a, b))
  assert got.shape == (2, M, N)
  for i in range(2):
    np.testing.assert_allclose(got[i], pairwise(np_iou, a[i], b[i]), rtol=1e-5, atol=1e-6)


def test_hand_worked_pair():
  a = jnp.array([[0., 0., 2., 2.]])
  b = jnp.array([[1., 1., 3., 3.]])
  # intersection 1, union 4 + 4 - 1 = 7, enclosing box 3 x 3 = 9.
  np.testing.assert_allclose(box_iou(a, b), [[1 / 7]], rtol=1e-6)
  np.testing.assert_allclose(box_iof(a, b), [[1 / 4]], rtol=1e-6)
  np.testing.assert_allclose(generalized_box_iou(a, b), [[1 / 7 - 2 / 9]], rtol=1e-6)
  np.testing.assert_allclose(box_iou_aligned(a[0], b[0]), 1 / 7, rtol=1e-6)
  np.testing.assert_allclose(generalized_box_iou_aligned(a[0], b[0]), 1 / 7 - 2 / 9, rtol=1e-6)
  np.testing.assert_allclose(box_area(jnp.array([[1., 2., 4., 7.]])), [15.])
  # disjoint boxes: IoU 0, GIoU = -(gap area) / enclosing area
  c = jnp.array([[4., 0., 6., 2.]])
  assert float(box_iou(a, c)[0, 0]) == 0.0
  np.testing.assert_allclose(generalized_box_iou(a, c), [[-(12 - 8) / 12]], rtol=1e-6)


DEGENERATE = np.array([
    [5., 5., 5., 9.],    # zero width
    [5., 5., 5., 9.],    # the same zero-width box again
    [0., 0., 0., 0.],    # all-zero padding row
    [3., 4., 8., 4.],    # zero height, inside the next box
    [2., 2., 10., 10.],  # a normal box
], np.float32)


def test_degenerate_boxes_give_zero_and_finite_values(pair_fns):
  iou = np.asarray(pair_fns["iou"](DEGENERATE, DEGENERATE))
  assert np.isfinite(iou).all()
  np.testing.assert_array_equal(iou[:4], 0.0)
  np.testing.assert_array_equal(iou[:, :4], 0.0)
  assert iou[4, 4] == 1.0
  assert np.isfinite(pair_fns["giou"](DEGENERATE, DEGENERATE)).all()
  iof = np.asarray(pair_fns["iof"](DEGENERATE, DEGENERATE))
  assert np.isfinite(iof).all() and (iof[:4] == 0).all()
  aligned = np.asarray(pair_fns["iou_aligned"](DEGENERATE, DEGENERATE[::-1]))
  assert np.isfinite(aligned).all() and (aligned[[0, 1, 3, 4]] == 0).all()


@pytest.mark.parametrize("name", ["iou", "iof", "giou"])
def test_degenerate_boxes_have_finite_gradients(name):
  fn = {"iou": box_iou, "iof": box_iof, "giou": generalized_box_iou}[name]
  grads = jax.grad(lambda a, b: fn(a, b).sum(), argnums=(0, 1))(DEGENERATE, DEGENERATE)
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()


@pytest.mark.parametrize("name", ["iou_aligned", "giou_aligned"])
def test_degenerate_aligned_gradients(name):
  fn = {"iou_aligned": box_iou_aligned, "giou_aligned": generalized_box_iou_aligned}[name]
  pred = DEGENERATE
  target = np.concatenate([DEGENERATE[:2], DEGENERATE[2:][::-1]])
  grads = jax.grad(lambda a, b: fn(a, b).sum(), argnums=(0, 1))(pred, target)
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()
  # a normal predicted box against a zero-width target outside it still gets a GIoU gradient
  target = np.array([12., 5., 12., 9.], np.float32)
  g = jax.grad(lambda a: generalized_box_iou_aligned(a, target))(DEGENERATE[4])
  assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).sum() > 0


def test_cxcywh_round_trip_and_values():
  rng = np.random.default_rng(6)
  boxes = random_boxes(rng, 11).reshape(1, 11, 4)
  cxcywh = np.asarray(box_xyxy_to_cxcywh(boxes))
  np.testing.assert_allclose(cxcywh[..., 0], (boxes[..., 0] + boxes[..., 2]) / 2, rtol=1e-6)
  np.testing.assert_allclose(cxcywh[..., 3], boxes[..., 3] - boxes[..., 1], rtol=1e-6)
  np.testing.assert_allclose(box_cxcywh_to_xyxy(cxcywh), boxes, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(box_cxcywh_to_xyxy(jnp.array([5., 6., 4., 2.])), [3., 5., 7., 7.])


def test_clip_boxes():
  boxes = np.array([[-5., -3., 20., 40.], [2., 3., 4., 5.], [30., 50., 35., 60.]], np.float32)
  np.testing.assert_array_equal(
      clip_boxes(boxes, (32, 24)),
      np.stack([np.clip(boxes[:, 0], 0, 24), np.clip(boxes[:, 1], 0, 32),
                np.clip(boxes[:, 2], 0, 24), np.clip(boxes[:, 3], 0, 32)], 1))
  # per-image shapes broadcast over (B, N): image 0 is 10 x 20, image 1 is 40 x 30
  batch = np.stack([boxes, boxes])
  h = np.array([[10.], [40.]], np.float32)
  w = np.array([[20.], [30.]], np.float32)
  got = np.asarray(clip_boxes(batch, (h, w)))
  np.testing.assert_array_equal(got[0, 0], [0., 0., 20., 10.])
  np.testing.assert_array_equal(got[1, 0], [0., 0., 20., 40.])
  np.testing.assert_array_equal(got[1, 2], [30., 40., 30., 40.])
