"""jaxdet.ops.nms against slow, obviously-correct greedy NMS written here in numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdet.ops.nms import batched_nms, filter_scores_and_topk, multiclass_nms

N = 64           # boxes per random scene
NUM_CLASSES = 3


def np_iou(a, b):
  """IoU of two float32 boxes, mmcv's formula (union guarded by 1e-6 as box_iou)."""
  w = max(np.float32(0), min(a[2], b[2]) - max(a[0], b[0]))
  h = max(np.float32(0), min(a[3], b[3]) - max(a[1], b[1]))
  inter = w * h
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / max(union, np.float32(1e-6))


def greedy_nms(boxes, scores, labels, iou_threshold, score_threshold=-np.inf, valid=None):
  """Visit boxes by descending score (ties: lower index first); keep a box unless a kept box
  of the same label overlaps it with IoU > iou_threshold. Returns the kept indices in order."""
  order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
  kept = []
  for i in order:
    if not scores[i] > score_threshold or (valid is not None and not valid[i]):
      continue
    if all(labels[j] != labels[i] or not np_iou(boxes[i], boxes[j]) > iou_threshold
           for j in kept):
      kept.append(i)
  return kept


def random_scene(seed, n=N, num_classes=NUM_CLASSES):
  """Clustered boxes (many overlaps), scores from a coarse grid (many exact ties)."""
  rng = np.random.default_rng(seed)
  centres = rng.uniform(20, 80, (4, 2))
  c = centres[rng.integers(0, 4, n)] + rng.normal(0, 6, (n, 2))
  wh = rng.uniform(8, 30, (n, 2))
  boxes = np.concatenate([c - wh / 2, c + wh / 2], 1).astype(np.float32)
  scores = (rng.integers(1, 9, n) / 8).astype(np.float32)
  labels = rng.integers(0, num_classes, n).astype(np.int32)
  return boxes, scores, labels


def as_list(out):
  index, valid = (np.asarray(x) for x in out)
  assert (index[~valid] == -1).all()
  assert valid.tolist() == sorted(valid.tolist(), reverse=True)  # valid slots come first
  return index[valid].tolist()


@pytest.fixture(scope="module")
def nms_full():
  """Jitted NMS with room for every box (threshold traced, so one compile per shape)."""
  return jax.jit(lambda b, s, l, t, v: batched_nms(b, s, l, iou_threshold=t, max_output=N,
                                                  valid=v))


@pytest.fixture(scope="module")
def nms_top5():
  return jax.jit(lambda b, s, l, t: batched_nms(b, s, l, iou_threshold=t, max_output=5,
                                               score_threshold=0.3))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("iou_threshold", [0.3, 0.6])
def test_batched_nms_matches_greedy_reference(nms_full, seed, iou_threshold):
  boxes, scores, labels = random_scene(seed)
  assert len(set(scores.tolist())) < N  # the scene has ties
  expected = greedy_nms(boxes, scores, labels, iou_threshold)
  assert 3 < len(expected) < N  # something was suppressed, something kept
  got = as_list(nms_full(boxes, scores, labels, iou_threshold, np.ones(N, bool)))
  assert got == expected
  # class-agnostic NMS (all labels equal) keeps fewer boxes and still matches
  same = np.zeros(N, np.int32)
  got_agnostic = as_list(nms_full(boxes, scores, same, iou_threshold, np.ones(N, bool)))
  assert got_agnostic == greedy_nms(boxes, scores, same, iou_threshold)
  assert len(got_agnostic) < len(got)


@pytest.mark.parametrize("seed", range(3))
def test_valid_mask_score_threshold_and_truncation(nms_full, nms_top5, seed):
  boxes, scores, labels = random_scene(seed + 10)
  valid = np.random.default_rng(seed).random(N) < 0.7
  got = as_list(nms_full(boxes, scores, labels, 0.5, valid))
  assert got == greedy_nms(boxes, scores, labels, 0.5, valid=valid)
  # max_output truncates the full result to its first boxes
  expected = greedy_nms(boxes, scores, labels, 0.5, score_threshold=0.3)
  assert as_list(nms_top5(boxes, scores, labels, 0.5)) == expected[:5]


def test_vmap_over_images_matches_each_image(nms_full):
  scenes = [random_scene(s) for s in (20, 21, 22)]
  b, s, l = (np.stack(x) for x in zip(*scenes))
  out = jax.vmap(nms_full, in_axes=(0, 0, 0, None, None))(b, s, l, 0.5, np.ones(N, bool))
  for i, scene in enumerate(scenes):
    assert as_list((out.index[i], out.valid[i])) == greedy_nms(*scene, 0.5)


def test_hand_worked_strictly_greater_and_ties():
  # IoU of boxes 0 and 1 is exactly 1/2 (intersection 1, union 2).
  boxes = jnp.array([[0., 0., 2., 1.], [0., 0., 1., 1.], [5., 5., 6., 6.], [5., 5., 6., 6.]])
  scores = jnp.array([0.9, 0.8, 0.7, 0.7])  # boxes 2 and 3 are identical and tie
  labels = jnp.zeros(4, jnp.int32)
  index, valid = batched_nms(boxes, scores, labels, iou_threshold=0.5, max_output=4)
  assert index[valid].tolist() == [0, 1, 2]  # IoU == threshold does not suppress; tie -> index 2
  index, valid = batched_nms(boxes, scores, labels, iou_threshold=0.49, max_output=4)
  assert index[valid].tolist() == [0, 2]
  # different labels never suppress each other
  index, valid = batched_nms(boxes, scores, jnp.array([0, 0, 1, 2]), iou_threshold=0.1,
                             max_output=6)
  assert index.tolist() == [0, 2, 3, -1, -1, -1]
  assert valid.tolist() == [True, True, True, False, False, False]


def test_degenerate_nan_and_all_below_threshold():
  boxes = jnp.array([[3., 3., 3., 9.], [3., 3., 3., 9.], [0., 0., 4., 4.], [0., 0., 4., 4.]])
  scores = jnp.array([0.9, 0.8, jnp.nan, 0.1])
  index, valid = batched_nms(boxes, scores, jnp.zeros(4, jnp.int32), iou_threshold=0.5,
                             max_output=4)
  # zero-width boxes overlap nothing (both kept); the NaN score is never a candidate
  assert index[valid].tolist() == [0, 1, 3]
  index, valid = batched_nms(boxes, scores, jnp.zeros(4, jnp.int32), iou_threshold=0.5,
                             max_output=3, score_threshold=0.95)
  assert not valid.any() and (index == -1).all()
  index, valid = batched_nms(jnp.zeros((0, 4)), jnp.zeros(0), jnp.zeros(0, jnp.int32),
                             iou_threshold=0.5, max_output=2)
  assert index.tolist() == [-1, -1] and not valid.any()


def test_bad_arguments_raise_value_error():
  b, s, l = jnp.zeros((3, 4)), jnp.zeros(3), jnp.zeros(3, jnp.int32)
  with pytest.raises(ValueError, match="max_output"):
    batched_nms(b, s, l, iou_threshold=0.5, max_output=0)
  with pytest.raises(ValueError, match="scores"):
    batched_nms(b, jnp.zeros(4), l, iou_threshold=0.5, max_output=2)
  with pytest.raises(ValueError, match="boxes"):
    batched_nms(jnp.zeros((3, 5)), s, l, iou_threshold=0.5, max_output=2)
  with pytest.raises(ValueError, match="scores"):
    multiclass_nms(b, jnp.zeros((4, 2)), score_thr=0.05, nms_pre=10, iou_threshold=0.5,
                   max_per_img=2)


# --- multiclass_nms --------------------------------------------------------------------------

def np_multiclass_nms(boxes, scores, score_thr, nms_pre, iou_threshold, max_per_img,
                      score_factors=None, min_bbox_size=-1):
  """mmdetection's test pipeline on (box, class) pairs, in plain Python."""
  n, c = scores.shape
  pairs = [(scores[i, j], i * c + j) for i in range(n) for j in range(c)
           if scores[i, j] > score_thr]
  pairs.sort(key=lambda p: (-p[0], p[1]))
  if nms_pre > 0:
    pairs = pairs[:nms_pre]
  cand_boxes = np.array([boxes[k // c] for _, k in pairs]).reshape(-1, 4)
  cand_labels = [k % c for _, k in pairs]
  cand_scores = [s * (score_factors[k // c] if score_factors is not None else np.float32(1))
                 for s, k in pairs]
  keep_mask = [True] * len(pairs)
  if min_bbox_size >= 0:
    keep_mask = [(b[2] - b[0] > min_bbox_size) and (b[3] - b[1] > min_bbox_size)
                 for b in cand_boxes]
  kept = greedy_nms(cand_boxes, cand_scores, cand_labels, iou_threshold, valid=keep_mask)
  kept = kept[:max_per_img]
  return ([pairs[k][1] // c for k in kept], [cand_labels[k] for k in kept],
          [cand_scores[k] for k in kept])


@pytest.fixture(scope="module")
def mc_nms():
  def fn(boxes, scores, factors):
    return multiclass_nms(boxes, scores, score_thr=0.05, nms_pre=40, iou_threshold=0.5,
                          max_per_img=12, score_factors=factors, min_bbox_size=0)
  return jax.jit(fn)


def multiclass_scene(seed):
  boxes, _, _ = random_scene(seed)
  rng = np.random.default_rng(seed)
  scores = (rng.integers(0, 12, (N, NUM_CLASSES)) / 16).astype(np.float32)  # many <= 0.05
  factors = (rng.integers(1, 5, N) / 4).astype(np.float32)
  boxes[:2, 2] = boxes[:2, 0]  # two zero-width boxes for min_bbox_size
  return boxes, scores, factors


@pytest.mark.parametrize("seed", range(4))
def test_multiclass_nms_matches_reference(mc_nms, seed):
  boxes, scores, factors = multiclass_scene(seed)
  assert (scores > 0.05).sum() > 40  # nms_pre really cuts
  out = mc_nms(boxes, scores, factors)
  idx, labels, sc = np_multiclass_nms(boxes, scores, 0.05, 40, 0.5, 12, factors, 0)
  valid = np.asarray(out.valid)
  assert np.asarray(out.index)[valid].tolist() == idx
  assert np.asarray(out.labels)[valid].tolist() == labels
  np.testing.assert_array_equal(np.asarray(out.scores)[valid], np.array(sc, np.float32))
  np.testing.assert_array_equal(np.asarray(out.boxes)[valid], boxes[idx].reshape(-1, 4))
  assert (np.asarray(out.labels)[~valid] == -1).all()
  assert (np.asarray(out.scores)[~valid] == 0).all()


def test_multiclass_nms_all_below_threshold(mc_nms):
  boxes, scores, factors = multiclass_scene(0)
  out = mc_nms(boxes, np.minimum(scores, 0.05), factors)  # score_thr is strict
  assert not np.asarray(out.valid).any()
  assert (np.asarray(out.index) == -1).all() and np.isfinite(np.asarray(out.boxes)).all()


def test_multiclass_nms_without_factors_or_nms_pre():
  boxes, scores, _ = multiclass_scene(5)
  out = multiclass_nms(boxes, scores, score_thr=0.3, nms_pre=-1, iou_threshold=0.6,
                       max_per_img=200)  # more slots than (box, class) pairs
  idx, labels, sc = np_multiclass_nms(boxes, scores, 0.3, -1, 0.6, 200)
  assert 12 < len(idx) < (scores > 0.3).sum()
  valid = np.asarray(out.valid)
  assert np.asarray(out.index)[valid].tolist() == idx
  assert np.asarray(out.labels)[valid].tolist() == labels
  np.testing.assert_array_equal(np.asarray(out.scores)[valid], np.array(sc, np.float32))


def test_filter_scores_and_topk_order():
  scores = jnp.array([[0.2, 0.9], [0.9, 0.01], [0.5, 0.2]])
  s, labels, box, valid = filter_scores_and_topk(scores, 0.1, 4)
  # ties (0.9 at pairs 1 and 2; 0.2 at pairs 0 and 5) in order of n * C + c
  np.testing.assert_allclose(s, [0.9, 0.9, 0.5, 0.2])
  assert box.tolist() == [0, 1, 2, 0] and labels.tolist() == [1, 0, 0, 0]
  assert valid.all()
  s, labels, box, valid = filter_scores_and_topk(scores, 0.6, 4)
  assert valid.tolist() == [True, True, False, False] and box[:2].tolist() == [0, 1]
