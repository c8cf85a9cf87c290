"""jaxdet.ops.coders against direct numpy transcriptions of the coder formulas."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdet.ops.coders import delta_decode, delta_encode, distance_decode, distance_encode

N = 16
ATSS_STDS = (0.1, 0.1, 0.2, 0.2)
MEANS = (0.05, -0.02, 0.01, 0.03)


def random_boxes(rng, n, size=100.0):
  xy = rng.uniform(0, size, (n, 2))
  wh = rng.uniform(2.0, size / 2, (n, 2))
  return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


# --- numpy transcription of the R-CNN delta coding (Girshick et al.), float32 -------------

def np_encode(p, g, means, stds):
  pw, ph = p[:, 2] - p[:, 0], p[:, 3] - p[:, 1]
  px, py = p[:, 0] + pw / 2, p[:, 1] + ph / 2
  gw, gh = g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
  gx, gy = g[:, 0] + gw / 2, g[:, 1] + gh / 2
  d = np.stack([(gx - px) / pw, (gy - py) / ph, np.log(gw / pw), np.log(gh / ph)], 1)
  return (d - np.float32(means)) / np.float32(stds)


def np_decode(p, d, means, stds, max_shape=None, ratio_clip=16 / 1000):
  d = d * np.float32(stds) + np.float32(means)
  pw, ph = p[:, 2] - p[:, 0], p[:, 3] - p[:, 1]
  px, py = p[:, 0] + pw / 2, p[:, 1] + ph / 2
  limit = np.float32(abs(math.log(ratio_clip)))
  dw, dh = np.clip(d[:, 2], -limit, limit), np.clip(d[:, 3], -limit, limit)
  cx, cy = px + pw * d[:, 0], py + ph * d[:, 1]
  w, h = pw * np.exp(dw), ph * np.exp(dh)
  out = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
  if max_shape is not None:
    out[:, 0::2] = np.clip(out[:, 0::2], 0, max_shape[1])
    out[:, 1::2] = np.clip(out[:, 1::2], 0, max_shape[0])
  return out


@pytest.fixture(scope="module")
def atss_coder():
  """Jitted (encode, decode) with ATSS's stds and made-up means, decode clipped to 60 x 80."""
  enc = jax.jit(functools.partial(delta_encode, means=MEANS, stds=ATSS_STDS))
  dec = jax.jit(functools.partial(delta_decode, means=MEANS, stds=ATSS_STDS))
  dec_clip = jax.jit(functools.partial(delta_decode, means=MEANS, stds=ATSS_STDS,
                                       max_shape=(60, 80)))
  return enc, dec, dec_clip


@pytest.mark.parametrize("seed", [0, 1])
def test_delta_encode_matches_numpy(atss_coder, seed):
  rng = np.random.default_rng(seed)
  p, g = random_boxes(rng, N), random_boxes(rng, N)
  np.testing.assert_allclose(atss_coder[0](p, g), np_encode(p, g, MEANS, ATSS_STDS),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_delta_decode_matches_numpy(atss_coder, seed):
  rng = np.random.default_rng(seed)
  p = random_boxes(rng, N)
  d = rng.normal(0, 3, (N, 4)).astype(np.float32)  # some dw, dh beyond the ratio clip
  np.testing.assert_allclose(atss_coder[1](p, d), np_decode(p, d, MEANS, ATSS_STDS),
                             rtol=1e-5, atol=1e-3)
  clipped = np_decode(p, d, MEANS, ATSS_STDS, max_shape=(60, 80))
  assert (clipped[:, 2] == 80).any() and (clipped[:, 3] == 60).any()
  np.testing.assert_allclose(atss_coder[2](p, d), clipped, rtol=1e-5, atol=1e-3)


def test_delta_hand_worked():
  roi = jnp.array([0., 0., 1., 1.])
  # dx = dy = dw = dh = 1 with unit stds: centre 0.5 + 1 * 1, size 1 * e.
  e = math.exp(1)
  np.testing.assert_allclose(delta_decode(roi, jnp.ones(4)),
                             [1.5 - e / 2, 1.5 - e / 2, 1.5 + e / 2, 1.5 + e / 2], rtol=1e-6)
  # anchor (0, 0, 10, 20) -> gt (5, 0, 15, 40): dx = 5/10, dy = 10/20, dw = 0, dh = log 2
  np.testing.assert_allclose(delta_encode(jnp.array([0., 0., 10., 20.]),
                                          jnp.array([5., 0., 15., 40.])),
                             [0.5, 0.5, 0.0, math.log(2)], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(delta_encode(jnp.array([0., 0., 10., 20.]),
                                          jnp.array([5., 0., 15., 40.]), stds=ATSS_STDS),
                             [5.0, 5.0, 0.0, math.log(2) / 0.2], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_delta_round_trips(atss_coder, seed):
  enc, dec, _ = atss_coder
  rng = np.random.default_rng(seed)
  p, g = random_boxes(rng, N), random_boxes(rng, N)
  np.testing.assert_allclose(dec(p, enc(p, g)), g, rtol=1e-5, atol=1e-3)
  # deltas inside the clip range come back unchanged
  d = rng.uniform(-2, 2, (N, 4)).astype(np.float32)
  np.testing.assert_allclose(enc(p, dec(p, d)), d, rtol=1e-4, atol=1e-4)


def test_delta_broadcasts_over_leading_dims(atss_coder):
  rng = np.random.default_rng(2)
  p = random_boxes(rng, N)
  d = rng.normal(0, 1, (3, N, 4)).astype(np.float32)
  got = np.asarray(atss_coder[1](p, d))
  assert got.shape == (3, N, 4)
  for b in range(3):
    np.testing.assert_allclose(got[b], np_decode(p, d[b], MEANS, ATSS_STDS), rtol=1e-5, atol=1e-3)
  # per-class deltas (N, C, 4) against one roi per row
  per_class = np.asarray(delta_decode(p[:, None], d.transpose(1, 0, 2), means=MEANS,
                                      stds=ATSS_STDS))
  np.testing.assert_allclose(per_class.transpose(1, 0, 2), got, rtol=1e-6, atol=1e-4)


def test_wh_ratio_clip_limits_huge_deltas():
  roi = jnp.array([[10., 10., 26., 42.]])  # 16 x 32, centre (18, 26)
  huge = jnp.array([[0., 0., 1e4, -1e4]])
  box = np.asarray(delta_decode(roi, huge))[0]
  assert np.isfinite(box).all()
  np.testing.assert_allclose(box[2] - box[0], 16 * 1000 / 16, rtol=1e-5)  # grown by 1/ratio
  np.testing.assert_allclose(box[3] - box[1], 32 * 16 / 1000, rtol=1e-5)  # shrunk by ratio
  np.testing.assert_allclose([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2], [18, 26], rtol=1e-6)
  wide = np.asarray(delta_decode(roi, huge, wh_ratio_clip=0.5))[0]
  np.testing.assert_allclose(wide[2] - wide[0], 32, rtol=1e-5)
  np.testing.assert_allclose(wide[3] - wide[1], 16, rtol=1e-5)


def test_ctr_clamp_variant():
  roi = jnp.array([[0., 0., 100., 100.]])
  d = jnp.array([[1., -0.1, -1e4, 1e4]])
  box = np.asarray(delta_decode(roi, d, add_ctr_clamp=True, ctr_clamp=32))[0]
  # centre shift 100 clamped to 32, -10 kept; dw only clamped from above (so ~0 width)
  np.testing.assert_allclose([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2], [82, 40], rtol=1e-6)
  assert box[2] - box[0] < 1e-3
  np.testing.assert_allclose(box[3] - box[1], 100 * 1000 / 16, rtol=1e-5)


def test_decode_per_image_max_shape_under_vmap():
  rng = np.random.default_rng(3)
  p = random_boxes(rng, N)
  d = rng.normal(0, 1, (2, N, 4)).astype(np.float32)
  shapes = np.array([[30, 50], [70, 90]], np.float32)
  got = jax.jit(jax.vmap(lambda dd, hw: delta_decode(p, dd, max_shape=hw)))(d, shapes)
  for b in range(2):
    np.testing.assert_allclose(got[b], np_decode(p, d[b], (0,) * 4, (1,) * 4, shapes[b]),
                               rtol=1e-5, atol=1e-3)
  unclipped = np.asarray(delta_decode(p, d, max_shape=(30, 50), clip_border=False))
  np.testing.assert_allclose(unclipped, np.stack([np_decode(p, x, (0,) * 4, (1,) * 4) for x in d]),
                             rtol=1e-5, atol=1e-3)


def test_bad_arguments_raise_value_error():
  with pytest.raises(ValueError, match="stds"):
    delta_encode(jnp.zeros((2, 4)), jnp.ones((2, 4)), stds=(1., 1.))
  with pytest.raises(ValueError, match="deltas"):
    delta_decode(jnp.zeros((2, 4)), jnp.zeros((2, 5)))
  with pytest.raises(ValueError, match="points"):
    distance_decode(jnp.zeros((2, 4)), jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="stride"):
    distance_encode(jnp.zeros((2, 2)), jnp.ones((2, 4)), stride=0)


# --- distance (FCOS) coding ------------------------------------------------------------------

def np_distance(points, boxes):
  return np.stack([points[:, 0] - boxes[:, 0], points[:, 1] - boxes[:, 1],
                   boxes[:, 2] - points[:, 0], boxes[:, 3] - points[:, 1]], 1)


@pytest.fixture(scope="module")
def fcos_coder():
  enc = jax.jit(lambda p, g, s: distance_encode(p, g, stride=s))
  dec = jax.jit(lambda p, d, s: distance_decode(p, d, stride=s, max_shape=(60, 80)))
  return enc, dec


def test_distance_coding(fcos_coder):
  enc, dec = fcos_coder
  rng = np.random.default_rng(4)
  g = random_boxes(rng, N, size=50.0)
  points = rng.uniform(0, 100, (N, 2)).astype(np.float32)
  strides = rng.choice([8., 16., 32.], N).astype(np.float32)
  expected = np_distance(points, g)
  assert (expected < 0).any()  # some points lie outside their box
  np.testing.assert_allclose(distance_encode(points, g), expected, rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(enc(points, g, strides), expected / strides[:, None], rtol=1e-6,
                             atol=1e-6)
  np.testing.assert_allclose(enc(points, g, 8.0), expected / 8, rtol=1e-6, atol=1e-6)
  # decode inverts encode (with and without stride normalisation)
  np.testing.assert_allclose(distance_decode(points, expected), g, rtol=1e-6, atol=1e-4)
  inside = g.copy()
  inside[:, 0::2] = np.clip(inside[:, 0::2], 0, 80)
  inside[:, 1::2] = np.clip(inside[:, 1::2], 0, 60)
  np.testing.assert_allclose(dec(points, enc(points, g, strides), strides), inside, rtol=1e-6,
                             atol=1e-4)
  d = rng.uniform(0, 5, (N, 4)).astype(np.float32)
  np.testing.assert_allclose(distance_encode(points, distance_decode(points, d)), d, rtol=1e-5,
                             atol=1e-4)


def test_distance_max_dis_and_hand_worked():
  point = jnp.array([10., 20.])
  box = jnp.array([4., 18., 30., 22.])
  np.testing.assert_allclose(distance_encode(point, box), [6., 2., 20., 2.])
  np.testing.assert_allclose(distance_encode(point, box, stride=2), [3., 1., 10., 1.])
  # GFL-style clamp to [0, max_dis - eps] in stride units
  np.testing.assert_allclose(distance_encode(point, box, max_dis=4.0, stride=2),
                             [3., 1., 3.9, 1.], rtol=1e-6)
  outside = jnp.array([12., 0., 30., 10.])
  np.testing.assert_allclose(distance_encode(point, outside, max_dis=100.0), [0., 20., 20., 0.])
  np.testing.assert_allclose(distance_decode(point, jnp.array([3., 1., 10., 1.]), stride=2), box)
