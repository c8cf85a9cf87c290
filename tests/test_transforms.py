"""Transforms against hand computations, round trips and independent references (colorsys).

The exact comparison with mmdetection's own transforms is in test_transforms_mmdet.py.
"""
import colorsys

import numpy as np
import pytest

from jaxdet.data import transforms as T


def _record(h=48, w=64, n=5, seed=0, crowd=None):
  rng = np.random.default_rng(seed)
  xy = rng.uniform(0, [w * 0.6, h * 0.6], (n, 2))
  wh = rng.uniform(3, [w * 0.4, h * 0.4], (n, 2))
  boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
  return dict(image=rng.integers(0, 256, (h, w, 3), dtype=np.uint8), boxes=boxes,
              labels=np.arange(n, dtype=np.int32),
              crowd=np.zeros(n, bool) if crowd is None else np.asarray(crowd),
              image_id=7, orig_size=(h, w))


def _rs(seed):
  return np.random.RandomState(seed)


# ----------------------------------------------------------------------------- resize

def test_keep_ratio_resize_640x480_by_hand():
  # 640 x 480 into (1333, 800): factor = min(1333 / 640, 800 / 480) = 800 / 480 = 5 / 3;
  # new w = int(640 * 5 / 3 + 0.5) = int(1067.17) = 1067, new h = int(800.5) = 800.
  rec = _record(h=480, w=640)
  rec["boxes"] = np.array([[10, 20, 110, 220], [600, 400, 640, 480]], np.float32)
  rec["labels"], rec["crowd"] = np.array([0, 1], np.int32), np.zeros(2, bool)
  out = T.Resize((1333, 800))(T.make_sample(rec))
  assert out["image"].shape == (800, 1067, 3)
  sx, sy = 1067 / 640, 800 / 480
  np.testing.assert_allclose(out["boxes"], [[10 * sx, 20 * sy, 110 * sx, 220 * sy],
                                            [600 * sx, 400 * sy, 1067, 800]], rtol=1e-6)
  meta = T.sample_meta(out)
  np.testing.assert_allclose(meta["scale_factor"], [sx, sy], rtol=1e-7)
  assert tuple(meta["img_shape"]) == (800, 1067) and not meta["flip"]


@pytest.mark.parametrize("w, h, scale, expect_wh", [
    (480, 640, (1333, 800), (800, 1067)),   # portrait: short side 480 -> 800
    (1000, 100, (1333, 800), (1333, 133)),  # very wide: the long side limits, 1.333x
    (640, 480, (1333, 640), (853, 640)),    # int(640 * 4 / 3 + 0.5) = int(853.83) = 853
    (333, 500, (800, 1333), (800, 1201)),   # order of the scale tuple does not matter
])
def test_rescale_size_by_hand(w, h, scale, expect_wh):
  assert T.rescale_size((w, h), scale)[0] == expect_wh
  assert T.Resize(scale).output_size(h, w) == expect_wh[::-1]


def test_fixed_resize_300():
  out = T.Resize((300, 300), keep_ratio=False)(T.make_sample(_record(h=48, w=64)))
  assert out["image"].shape == (300, 300, 3)
  np.testing.assert_allclose(T.sample_meta(out)["scale_factor"], [300 / 64, 300 / 48], rtol=1e-7)


def test_resize_boxes_clipped_to_image():
  rec = _record(h=40, w=50, n=1)
  rec["boxes"] = np.array([[-5, -5, 60, 45]], np.float32)
  out = T.Resize((100, 80))(T.make_sample(rec))  # factor min(100 / 50, 80 / 40) = 2
  np.testing.assert_allclose(out["boxes"], [[0, 0, 100, 80]])


def test_random_choice_resize_gives_exactly_two_sizes():
  t = T.RandomChoiceResize([(1333, 640), (1333, 800)])
  small = T.make_sample(_record(h=48, w=64))
  small["image"] = np.zeros((480, 640, 3), np.uint8)
  sizes = {t(small, _rs(s))["image"].shape[:2] for s in range(40)}
  assert sizes == {(640, 853), (800, 1067)}


def test_resize_image_matches_pillow_and_keeps_values():
  img = np.full((10, 12, 3), 77, np.uint8)
  assert np.all(T.resize_image(img, (30, 25)) == 77)
  f = np.random.default_rng(0).uniform(-50, 300, (10, 12, 3)).astype(np.float32)
  out = T.resize_image(f, (24, 20))
  assert out.shape == (20, 24, 3) and out.dtype == np.float32
  assert out.min() >= f.min() - 1e-3 and out.max() <= f.max() + 1e-3


# ----------------------------------------------------------------------------- flip, pad

def test_flip_by_hand_and_twice_is_identity():
  rec = _record(h=30, w=50, n=1)
  rec["boxes"] = np.array([[5, 6, 20, 16]], np.float32)
  s = T.make_sample(rec)
  f = T.flip_horizontal(s)
  np.testing.assert_array_equal(f["boxes"], [[50 - 20, 6, 50 - 5, 16]])
  np.testing.assert_array_equal(f["image"][:, 0], s["image"][:, -1])
  ff = T.flip_horizontal(f)
  np.testing.assert_array_equal(ff["image"], s["image"])
  np.testing.assert_array_equal(ff["boxes"], s["boxes"])
  assert not T.sample_meta(ff)["flip"] and T.sample_meta(f)["flip"]


def test_random_flip_probability():
  s = T.make_sample(_record())
  flips = [T.sample_meta(T.RandomFlip(0.5)(s, _rs(i)))["flip"] for i in range(400)]
  assert 150 < sum(flips) < 250
  assert not any(T.sample_meta(T.RandomFlip(0.0)(s, _rs(i)))["flip"] for i in range(20))
  assert all(T.sample_meta(T.RandomFlip(1.0)(s, _rs(i)))["flip"] for i in range(20))


@pytest.mark.parametrize("h, w, d, expect", [(800, 1067, 32, (800, 1088)), (33, 64, 32, (64, 64)),
                                             (300, 300, 1, (300, 300))])
def test_pad_to_multiple(h, w, d, expect):
  img = np.ones((h, w, 3), np.uint8)
  out = T.pad_to_multiple(img, d)
  assert out.shape[:2] == expect
  assert out[:h, :w].all() and out.sum() == h * w * 3  # padding is 0


def test_bucket_shapes():
  p = dict(kind="standard", size_divisor=32)
  assert T.bucket_shapes(p, (1333, 800)) == [(800, 1344), (1344, 800)]
  assert T.bucket_shapes(dict(p, multiscale=((1333, 640), (1333, 800))), (1333, 800)) == [
      (800, 1344), (1344, 800)]
  assert T.bucket_shapes(dict(kind="ssd", size_divisor=1), (300, 300)) == [(300, 300)]
  assert T.bucket_shapes(dict(kind="detr", size_divisor=1), (1333, 800)) == [(800, 1333),
                                                                            (1333, 800)]
  assert T.bucket_shapes(p, (1333, 800), buckets=[(512, 512)]) == [(512, 512)]
  assert T.choose_bucket(480, 640, [(800, 1344), (1344, 800)]) == 0
  assert T.choose_bucket(640, 480, [(800, 1344), (1344, 800)]) == 1
  assert T.choose_bucket(500, 500, [(800, 1344), (1344, 800)]) == 0


def test_every_keep_ratio_resize_fits_its_bucket():
  buckets = T.bucket_shapes(dict(kind="standard", size_divisor=32), (1333, 800))
  rng = np.random.default_rng(0)
  for h, w in rng.integers(20, 3000, (300, 2)):
    nh, nw = T.Resize((1333, 800)).output_size(h, w)
    bh, bw = buckets[T.choose_bucket(h, w, buckets)]
    assert nh <= bh and nw <= bw, (h, w, nh, nw)


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("seed", range(6))
def test_resize_flip_pad_round_trip(seed):
  rng = np.random.default_rng(seed)
  h, w = (int(v) for v in rng.integers(30, 700, 2))
  rec = _record(h=h, w=w, n=8, seed=seed)
  chain = T.Compose([T.RandomChoiceResize([(1333, 640), (1333, 800)]), T.RandomFlip(0.5)])
  out = chain(T.make_sample(rec), _rs(seed))
  padded = T.pad_to_multiple(out["image"], 32)
  meta = T.sample_meta(out)
  assert padded.shape[0] % 32 == 0 and padded.shape[1] % 32 == 0
  back = T.boxes_to_original(out["boxes"], meta)
  np.testing.assert_allclose(back, rec["boxes"], atol=1e-3)


def test_ssd_expand_resize_flip_round_trip():
  rec = _record(h=60, w=80, n=6, seed=3)
  crop = T.MinIoURandomCrop()
  crop.sample_mode = (1,)  # never crop: every box must map back exactly
  chain = T.Compose([T.Expand((123.675, 116.28, 103.53), prob=1.0), crop,
                     T.Resize((300, 300), keep_ratio=False), T.RandomFlip(1.0)])
  for seed in range(5):
    out = chain(T.make_sample(rec), _rs(seed))
    meta = T.sample_meta(out)
    assert meta["flip"] and (meta["offset"] != 0).any()
    np.testing.assert_allclose(T.boxes_to_original(out["boxes"], meta), rec["boxes"], atol=1e-3)


def test_detr_crop_branch_maps_inner_boxes_back():
  rec = _record(h=400, w=600, n=1)
  rec["boxes"] = np.array([[280, 180, 300, 200]], np.float32)  # small box near the centre
  chain = T.Compose([T.RandomFlip(1.0), T.Resize((600, 1333)), lambda s, r: T.crop(s, (100, 50, 500, 450)),
                     T.Resize((512, 1333))])
  out = chain(T.make_sample(rec), _rs(0))
  np.testing.assert_allclose(T.boxes_to_original(out["boxes"], T.sample_meta(out)),
                             rec["boxes"], atol=1e-3)


def test_boxes_to_original_vmaps_in_jax():
  jax = pytest.importorskip("jax")
  jnp = jax.numpy
  recs = [_record(h=50 + 10 * i, w=70, n=4, seed=i) for i in range(3)]
  outs = [T.Compose([T.Resize((200, 120)), T.RandomFlip(0.5)])(T.make_sample(r), _rs(i + 1))
          for i, r in enumerate(recs)]
  metas = [T.sample_meta(o) for o in outs]
  batch_meta = {k: jnp.asarray(np.stack([m[k] for m in metas]))
                for k in ("scale_factor", "offset", "flip", "img_shape")}
  boxes = jnp.asarray(np.stack([o["boxes"] for o in outs]))
  back = jax.jit(jax.vmap(T.boxes_to_original))(boxes, batch_meta)
  np.testing.assert_allclose(np.asarray(back), np.stack([r["boxes"] for r in recs]), atol=1e-3)
  assert {m["flip"] for m in metas} == {True, False}


# ----------------------------------------------------------------------------- SSD transforms

def test_expand_places_image_and_shifts_boxes():
  rec = _record(h=20, w=30, n=3)
  for seed in range(10):
    out = T.Expand((123.675, 116.28, 103.53), ratio_range=(2, 3), prob=1.0)(
        T.make_sample(rec), _rs(seed))
    left, top = (int(v) for v in T.sample_meta(out)["offset"])
    H, W = out["image"].shape[:2]
    assert 40 <= H <= 60 and 60 <= W <= 90
    np.testing.assert_array_equal(out["image"][top:top + 20, left:left + 30], rec["image"])
    np.testing.assert_allclose(out["boxes"], rec["boxes"] + [left, top, left, top])
    mask = np.ones((H, W), bool)
    mask[top:top + 20, left:left + 30] = False
    assert (out["image"][mask] == [123, 116, 103]).all()  # mmdet casts the mean to uint8


def test_expand_probability():
  s = T.make_sample(_record())
  t = T.Expand((0, 0, 0), prob=0.5)
  grown = sum(t(s, _rs(i))["image"].shape != s["image"].shape for i in range(200))
  assert 70 < grown < 130


def _iou(a, b):
  lt, rb = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
  inter = np.prod(np.clip(rb - lt, 0, None))
  return inter / (np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter)


@pytest.mark.parametrize("min_iou", [0.1, 0.5])
def test_min_iou_random_crop_rules(min_iou):
  rec = _record(h=100, w=120, n=2, seed=1)
  rec["boxes"] = np.array([[10, 10, 100, 90], [40, 30, 70, 60] if min_iou < 0.3 else
                           [20, 15, 95, 85]], np.float32)  # both boxes can reach IoU 0.5
  t = T.MinIoURandomCrop()
  t.sample_mode = (min_iou,)  # always crop with this threshold
  seen_drop = False
  for seed in range(25):
    out = t(T.make_sample(rec), _rs(seed))
    ox, oy = T.sample_meta(out)["offset"]
    ch, cw = out["image"].shape[:2]
    patch = np.array([-ox, -oy, -ox + cw, -oy + ch])
    assert ch * cw >= 0.3 * 100 * 0.3 * 120 - 1 and 0.5 <= ch / cw <= 2.1
    for b in rec["boxes"]:  # every box overlaps the crop by at least min IoU
      assert _iou(patch, b) >= min_iou - 1e-6
    c = (rec["boxes"][:, :2] + rec["boxes"][:, 2:]) / 2
    inside = (c[:, 0] > patch[0]) & (c[:, 1] > patch[1]) & (c[:, 0] < patch[2]) & (c[:, 1] < patch[3])
    assert inside.any()
    np.testing.assert_array_equal(out["labels"], rec["labels"][inside])
    expect = rec["boxes"][inside] - [patch[0], patch[1], patch[0], patch[1]]
    expect = np.clip(expect, 0, [cw, ch, cw, ch])
    np.testing.assert_allclose(out["boxes"], expect, atol=1e-4)
    np.testing.assert_array_equal(
        out["image"], rec["image"][int(patch[1]):int(patch[3]), int(patch[0]):int(patch[2])])
    seen_drop |= not inside.all()
  if min_iou == 0.1:
    assert seen_drop  # a crop that leaves a box centre outside drops that box


def test_min_iou_random_crop_mode_one_keeps_image():
  s = T.make_sample(_record())
  t = T.MinIoURandomCrop()
  t.sample_mode = (1,)
  assert t(s, _rs(0)) is s


def test_rgb_hsv_against_colorsys():
  rng = np.random.default_rng(0)
  rgb = rng.uniform(0, 255, (200, 3)).astype(np.float32)
  rgb[:5] = [[10, 10, 10], [255, 0, 0], [0, 255, 0], [0, 0, 255], [0, 0, 0]]
  hsv = T.rgb_to_hsv(rgb)
  ref = np.array([colorsys.rgb_to_hsv(*(p / 255.0)) for p in rgb.astype(np.float64)])
  np.testing.assert_allclose(hsv[:, 1], ref[:, 1], atol=1e-5)
  np.testing.assert_allclose(hsv[:, 2], ref[:, 2] * 255, atol=1e-3)
  dh = np.abs(hsv[:, 0] - ref[:, 0] * 360)
  np.testing.assert_array_less(np.minimum(dh, 360 - dh)[ref[:, 1] > 0], 1e-2)
  back = T.hsv_to_rgb(hsv)
  np.testing.assert_allclose(back, rgb, atol=2e-3)
  shifted = hsv.copy()
  shifted[:, 0] = (shifted[:, 0] + 100) % 360
  ref_back = np.array([colorsys.hsv_to_rgb(h / 360, s, v / 255) for h, s, v in shifted]) * 255
  np.testing.assert_allclose(T.hsv_to_rgb(shifted), ref_back, atol=2e-3)


def test_photometric_distortion_dtype_range_and_determinism():
  s = T.make_sample(_record(h=30, w=40))
  t = T.PhotoMetricDistortion()
  outs = [t(s, _rs(i))["image"] for i in range(8)]
  for o in outs:
    assert o.dtype == np.uint8 and o.shape == s["image"].shape
  np.testing.assert_array_equal(t(s, _rs(3))["image"], outs[3])
  assert sum(not np.array_equal(o, s["image"]) for o in outs) >= 6
  f = T.PhotoMetricDistortion(out_uint8=False)(s, _rs(3))["image"]
  assert f.dtype == np.float32
  np.testing.assert_array_equal(np.clip(np.rint(f), 0, 255).astype(np.uint8), outs[3])


def test_photometric_brightness_and_swap_by_hand():
  # With contrast, saturation and hue fixed at identity only the brightness shift and the
  # channel shuffle remain; the random draws follow mmdet's order (6 flags, 4 values, perm).
  s = T.make_sample(_record(h=8, w=8))
  t = T.PhotoMetricDistortion(brightness_delta=10, contrast_range=(1, 1),
                              saturation_range=(1, 1), hue_delta=0, out_uint8=False)
  swapped = 0
  for seed in range(12):
    rng = _rs(seed)
    _, bright, _, _, _, swap = (rng.randint(2) for _ in range(6))
    delta = rng.uniform(-10, 10)
    for lo, hi in ((1, 1), (1, 1), (0, 0)):
      rng.uniform(lo, hi)
    perm_bgr = rng.permutation(3)
    expect = s["image"].astype(np.float32) + (np.float32(delta) if bright else 0)
    if swap:
      expect = expect[..., ::-1][..., perm_bgr][..., ::-1]  # mmdet shuffles BGR channels
      swapped += 1
    np.testing.assert_allclose(t(s, _rs(seed))["image"], expect, atol=2e-3)
  assert 0 < swapped < 12


# ----------------------------------------------------------------------------- DETR

def test_random_crop_absolute_range():
  rec = _record(h=700, w=900, n=4, seed=2)
  t = T.RandomCrop((384, 600))
  for seed in range(10):
    out = t(T.make_sample(rec), _rs(seed))
    ch, cw = out["image"].shape[:2]
    assert 384 <= ch <= 600 and 384 <= cw <= 600
    b = out["boxes"]
    assert ((b[:, 0] < cw) & (b[:, 2] > 0) & (b[:, 1] < ch) & (b[:, 3] > 0)).all()
    assert (b >= 0).all() and (b[:, 2] <= cw).all() and (b[:, 3] <= ch).all()
  small = T.make_sample(_record(h=200, w=300))
  assert t(small, _rs(0))["image"].shape[:2] == (200, 300)  # never larger than the image


def test_detr_pipeline_sizes():
  p = dict(kind="detr", size_divisor=1)
  chain = T.build_train_transform(p, (1333, 800))
  rec = _record(h=480, w=640, n=6, seed=4)
  rec["image"] = np.zeros((480, 640, 3), np.uint8)
  shorts = set()
  for seed in range(30):
    out = chain(T.make_sample(rec), _rs(seed))
    h, w = out["image"].shape[:2]
    assert max(h, w) <= 1333
    shorts.add(min(h, w))
    if max(h, w) < 1333:
      assert min(h, w) in range(480, 801, 32)
  assert len(shorts) > 3


# ----------------------------------------------------------------------------- targets, norm

def test_training_targets_drop_crowd_and_tiny():
  rec = _record(n=4, crowd=[False, True, False, False])
  rec["boxes"] = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [5, 5, 5.9, 20], [1, 1, 2, 2]],
                          np.float32)
  out = T.training_targets(T.make_sample(rec), min_size=1.0)
  np.testing.assert_array_equal(out["labels"], [0, 3])


def test_normalize_images_zero_padding_and_values():
  jnp = pytest.importorskip("jax.numpy")
  rng = np.random.default_rng(0)
  imgs = rng.integers(0, 256, (2, 8, 12, 3), dtype=np.uint8)
  shapes = np.array([[5, 7], [8, 12]], np.int32)
  for norm in (T.PYTORCH_NORM, T.CAFFE_NORM):
    out = np.asarray(T.normalize_images(jnp.asarray(imgs), jnp.asarray(shapes), **norm))
    for i, (h, w) in enumerate(shapes):
      x = imgs[i].astype(np.float32)
      if norm["to_bgr"]:
        x = x[..., ::-1]
      ref = (x - np.array(norm["mean"], np.float32)) / np.array(norm["std"], np.float32)
      np.testing.assert_allclose(out[i, :h, :w], ref[:h, :w], rtol=1e-6, atol=1e-5)
      assert not out[i, h:].any() and not out[i, :, w:].any()
  assert (out[0, 0, 0] != 0).all()


def test_bad_inputs():
  with pytest.raises(ValueError, match="scale"):
    T.Resize((0, 800))
  with pytest.raises(ValueError, match="shape"):
    T.make_sample(dict(image=np.zeros((4, 4), np.uint8), boxes=np.zeros((0, 4)),
                       labels=np.zeros(0), image_id=1))
  with pytest.raises(ValueError, match="kind"):
    T.build_train_transform(dict(kind="yolo"), (1333, 800))
  with pytest.raises(ValueError, match="prob"):
    T.RandomFlip(1.5)
