"""Prior grids against slow per-element references written from mmdetection's algorithm.

The references compute one prior at a time from its (level, y, x, base index) with numpy
float32 scalars, in the operation order of mmdetection's generators, so equality is exact.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdet.priors import (anchor_grid, level_counts, point_grid, ssd_anchor_grid,
                           ssd_min_max_sizes, ssd_num_base_anchors, valid_flags)

f32 = np.float32
FPN_STRIDES = (8, 16, 32, 64, 128)
SSD300 = dict(input_size=300, basesize_ratio_range=(0.15, 0.9), strides=(8, 16, 32, 64, 100, 300),
              ratios=([2], [2, 3], [2, 3], [2, 3], [2], [2]))
SSD300_FEATS = [(s, s) for s in (38, 19, 10, 5, 3, 1)]
SSD512 = dict(input_size=512, basesize_ratio_range=(0.1, 0.9),
              strides=(8, 16, 32, 64, 128, 256, 512),
              ratios=([2], [2, 3], [2, 3], [2, 3], [2, 3], [2], [2]))
SSD512_FEATS = [(s, s) for s in (64, 32, 16, 8, 4, 2, 1)]


def fpn_featmaps(h, w, strides=FPN_STRIDES):
  """Feature sizes of an FPN on an (h, w) input: C3 is ceil(h / 8), then each level halves
  (3x3 stride-2 pad-1 convs: ceil)."""
  sizes = [(math.ceil(h / 8), math.ceil(w / 8))]
  for _ in strides[1:]:
    fh, fw = sizes[-1]
    sizes.append((math.ceil(fh / 2), math.ceil(fw / 2)))
  return sizes


def index_to_cell(index, featmap_sizes, per_cell):
  """(level, y, x, base) of a prior's flat index, in the order level, y, x, base."""
  for level, ((h, w), k) in enumerate(zip(featmap_sizes, per_cell)):
    n = h * w * k
    if index < n:
      cell, base = divmod(index, k)
      y, x = divmod(cell, w)
      return level, y, x, base
    index -= n
  raise IndexError(index)


def ref_box(cx, cy, w, h, x_shift, y_shift):
  half = f32(0.5)
  return [cx - half * w + x_shift, cy - half * h + y_shift,
          cx + half * w + x_shift, cy + half * h + y_shift]


def ref_anchor(index, featmap_sizes, strides, ratios, scales, base_sizes=None,
               center_offset=0., scale_major=True):
  """AnchorGenerator: base size * (1/sqrt(r), sqrt(r)) * scale, centred at offset * base."""
  level, y, x, b = index_to_cell(index, featmap_sizes, [len(ratios) * len(scales)] * 5)
  stride = strides[level]
  base = f32(stride if base_sizes is None else base_sizes[level])
  if scale_major:
    r, s = ratios[b // len(scales)], scales[b % len(scales)]
  else:
    s, r = scales[b // len(ratios)], ratios[b % len(ratios)]
  h_ratio = np.sqrt(f32(r))
  w_ratio = f32(1) / h_ratio
  if scale_major:
    w, h = base * w_ratio * f32(s), base * h_ratio * f32(s)
  else:
    w, h = base * f32(s) * w_ratio, base * f32(s) * h_ratio
  c = f32(center_offset * float(base))
  return ref_box(c, c, w, h, f32(x) * f32(stride), f32(y) * f32(stride))


def octave_scales(base, n):
  return [base * 2**(i / n) for i in range(n)]


def check_sampled(got, ref_fn, count, rng, n=400):
  got = np.asarray(got)
  assert got.shape == (count, 4) and got.dtype == np.float32
  idx = np.unique(np.concatenate([[0, count - 1], rng.integers(0, count, n)]))
  want = np.array([ref_fn(int(i)) for i in idx], np.float32)
  np.testing.assert_array_equal(got[idx], want)


def test_fpn_featmaps_helper():
  assert fpn_featmaps(800, 1216) == [(100, 152), (50, 76), (25, 38), (13, 19), (7, 10)]


def test_mmdet_docstring_example():
  # AnchorGenerator([16], [1.], [1.], [9]).grid_priors([(2, 2)]) from mmdetection's docstring.
  got = anchor_grid([(2, 2)], strides=[16], ratios=[1.], scales=[1.], base_sizes=[9])
  want = [[-4.5, -4.5, 4.5, 4.5], [11.5, -4.5, 20.5, 4.5],
          [-4.5, 11.5, 4.5, 20.5], [11.5, 11.5, 20.5, 20.5]]
  np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("image", [(64, 96), (800, 1216), (333, 517)])
def test_retinanet_anchors(image):
  sizes = fpn_featmaps(*image)
  ratios, scales = (0.5, 1., 2.), octave_scales(4, 3)
  got = anchor_grid(sizes, strides=FPN_STRIDES, ratios=ratios, octave_base_scale=4,
                    scales_per_octave=3)
  count = sum(level_counts(sizes, 9))
  check_sampled(got, lambda i: ref_anchor(i, sizes, FPN_STRIDES, ratios, scales), count,
                np.random.default_rng(0))
  # The first cell's 9 anchors, by hand: size 8 * 4 * 2^(k/3), ratio 0.5 -> w = s * sqrt(2).
  first = np.asarray(got)[:9]
  w = first[:, 2] - first[:, 0]
  h = first[:, 3] - first[:, 1]
  want_w = [32 * 2**(k / 3) * math.sqrt(2) for k in range(3)] + [32 * 2**(k / 3) for k in range(3)]
  np.testing.assert_allclose(w[:6], want_w, rtol=1e-6)
  np.testing.assert_allclose(h / w, [0.5] * 3 + [1.] * 3 + [2.] * 3, rtol=1e-6)


def test_atss_anchors_800x1216_all():
  sizes = fpn_featmaps(800, 1216)
  got = np.asarray(anchor_grid(sizes, strides=FPN_STRIDES, ratios=[1.], octave_base_scale=8,
                               scales_per_octave=1))
  assert got.shape == (20267, 4)
  want = np.array([ref_anchor(i, sizes, FPN_STRIDES, [1.], [8.]) for i in range(len(got))],
                  np.float32)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got[0], [-32, -32, 32, 32])  # 8 * 8 around (0, 0)


def test_anchor_options():
  sizes = [(3, 5), (2, 3)]
  strides = [(8, 8), (16, 16)]
  kw = dict(strides=strides, ratios=[0.5, 2.], scales=[1., 1.5], base_sizes=[10, 20],
            center_offset=0.5)
  for scale_major in (True, False):
    got = anchor_grid(sizes, scale_major=scale_major, **kw)
    count = sum(level_counts(sizes, 4))
    check_sampled(got, lambda i: ref_anchor(
        i, sizes, [8, 16], [0.5, 2.], [1., 1.5], base_sizes=[10, 20], center_offset=0.5,
        scale_major=scale_major), count, np.random.default_rng(1), n=30)


def test_rectangular_strides():
  got = np.asarray(anchor_grid([(2, 3)], strides=[(8, 16)], ratios=[1.], scales=[1.]))
  # base size = min stride = 8, centre offset 0: x shifts step 8, y shifts step 16.
  np.testing.assert_array_equal(got[:, 0], [-4, 4, 12, -4, 4, 12])
  np.testing.assert_array_equal(got[:, 1], [-4, -4, -4, 12, 12, 12])


def test_ssd_min_max_sizes_hand_worked():
  assert ssd_min_max_sizes(input_size=300, basesize_ratio_range=(0.15, 0.9), num_levels=6) == (
      (21, 45), (45, 99), (99, 153), (153, 207), (207, 261), (261, 315))
  assert ssd_min_max_sizes(input_size=512, basesize_ratio_range=(0.1, 0.9), num_levels=7) == (
      (20, 51), (51, 133), (133, 215), (215, 296), (296, 378), (378, 460), (460, 542))
  # VOC SSD300 (0.2, 0.9): 20..90% in steps of 17, first level 10%-20%.
  assert ssd_min_max_sizes(input_size=300, basesize_ratio_range=(0.2, 0.9), num_levels=6) == (
      (30, 60), (60, 111), (111, 162), (162, 213), (213, 264), (264, 315))


def ref_ssd_prior(index, featmap_sizes, strides, ratios, min_max):
  """One SSD prior: (scale 1, ratio 1), (scale sqrt(max/min), ratio 1), then 1/r, r for each r;
  widths base * scale / sqrt(ratio) (scale-major product order), centre stride / 2."""
  per_cell = ssd_num_base_anchors(ratios)
  level, y, x, b = index_to_cell(index, featmap_sizes, per_cell)
  lo, hi = min_max[level]
  big = f32(np.sqrt(hi / lo))
  ext = [1.] + [v for r in ratios[level] for v in (1 / r, r)]
  scale, ratio = [(f32(1), 1.), (big, 1.)][b] if b < 2 else (f32(1), ext[b - 1])
  h_ratio = np.sqrt(f32(ratio))
  w_ratio = f32(1) / h_ratio
  w, h = f32(lo) * scale * w_ratio, f32(lo) * scale * h_ratio
  c = f32(strides[level] / 2.)
  s = f32(strides[level])
  return ref_box(c, c, w, h, f32(x) * s, f32(y) * s)


@pytest.mark.parametrize("cfg,feats,count", [(SSD300, SSD300_FEATS, 8732),
                                             (SSD512, SSD512_FEATS, 24564)])
def test_ssd_priors(cfg, feats, count):
  got = np.asarray(ssd_anchor_grid(feats, **cfg))
  assert got.shape == (count, 4)
  min_max = ssd_min_max_sizes(input_size=cfg["input_size"],
                              basesize_ratio_range=cfg["basesize_ratio_range"],
                              num_levels=len(feats))
  want = np.array([ref_ssd_prior(i, feats, cfg["strides"], cfg["ratios"], min_max)
                   for i in range(count)], np.float32)
  np.testing.assert_array_equal(got, want)


def test_ssd300_first_cell_hand_worked():
  got = np.asarray(ssd_anchor_grid(SSD300_FEATS, **SSD300))[:4]
  s2 = math.sqrt(2)
  big = math.sqrt(21 * 45)
  want = [[4 - 10.5, 4 - 10.5, 4 + 10.5, 4 + 10.5],
          [4 - big / 2, 4 - big / 2, 4 + big / 2, 4 + big / 2],
          [4 - 10.5 * s2, 4 - 10.5 / s2, 4 + 10.5 * s2, 4 + 10.5 / s2],  # ratio 1/2: wide
          [4 - 10.5 / s2, 4 - 10.5 * s2, 4 + 10.5 / s2, 4 + 10.5 * s2]]
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
  last = np.asarray(ssd_anchor_grid(SSD300_FEATS, **SSD300))[-4:]
  np.testing.assert_allclose(last[0], [150 - 130.5] * 2 + [150 + 130.5] * 2, rtol=1e-6)


def test_ssd_scale_major_true_differs():
  # mmdetection's class default (scale_major=True) keeps different rows than its SSD configs.
  a = np.asarray(ssd_anchor_grid(SSD300_FEATS, **SSD300))
  b = np.asarray(ssd_anchor_grid(SSD300_FEATS, scale_major=True, **SSD300))
  assert a.shape == b.shape and not np.array_equal(a, b)


@pytest.mark.parametrize("offset,with_stride,strides", [
    (0.5, False, FPN_STRIDES), (0.5, True, FPN_STRIDES), (0., False, FPN_STRIDES),
    (0.3, True, (12, 20, 100, 300, 7))])
def test_point_grid(offset, with_stride, strides):
  sizes = fpn_featmaps(100, 152)
  got = np.asarray(point_grid(sizes, strides=strides, offset=offset, with_stride=with_stride))
  want = []
  for (h, w), s in zip(sizes, strides):
    for y in range(h):
      for x in range(w):
        p = [(f32(x) + f32(offset)) * f32(s), (f32(y) + f32(offset)) * f32(s)]
        want.append(p + [s, s] if with_stride else p)
  np.testing.assert_array_equal(got, np.array(want, np.float32))
  assert got.dtype == np.float32


def ref_valid(featmap_sizes, strides, per_cell, pad_h, pad_w):
  out = []
  for (h, w), s, k in zip(featmap_sizes, strides, per_cell):
    vh = min(math.ceil(pad_h / s), h)
    vw = min(math.ceil(pad_w / s), w)
    for y in range(h):
      for x in range(w):
        out += [y < vh and x < vw] * k
  return np.array(out)


def test_valid_flags_vmapped_over_pad_shapes():
  sizes = fpn_featmaps(320, 480)
  pads = np.array([[320, 480], [300, 480], [257, 31], [32, 480], [1, 1], [500, 700]], np.int32)
  fn = jax.jit(jax.vmap(lambda p: valid_flags(sizes, p, strides=FPN_STRIDES, num_base_priors=9)))
  got = np.asarray(fn(jnp.asarray(pads)))
  assert got.dtype == bool and got.shape == (len(pads), sum(level_counts(sizes, 9)))
  for row, (ph, pw) in zip(got, pads):
    np.testing.assert_array_equal(row, ref_valid(sizes, FPN_STRIDES, [9] * 5, ph, pw))
  assert got[0].all() and not got[2].all()


def test_valid_flags_per_level_bases_and_float_pad():
  feats = SSD300_FEATS
  nb = ssd_num_base_anchors(SSD300["ratios"])
  for pad in [(300, 300), (200.5, 99.0), (64, 300)]:
    got = np.asarray(valid_flags(feats, pad, strides=SSD300["strides"], num_base_priors=nb))
    np.testing.assert_array_equal(got, ref_valid(feats, SSD300["strides"], nb, *pad))


def test_level_counts():
  assert level_counts([(2, 3), (1, 2)], 9) == (54, 18)
  assert level_counts([(2, 3), (1, 2)], [4, 6]) == (24, 12)
  assert sum(level_counts(SSD300_FEATS, ssd_num_base_anchors(SSD300["ratios"]))) == 8732


def test_usable_inside_jit():
  @jax.jit
  def f(x):
    return anchor_grid([(2, 3)], strides=[8], ratios=[1.], scales=[4.]) + x
  np.testing.assert_array_equal(
      np.asarray(f(0.)), np.asarray(anchor_grid([(2, 3)], strides=[8], ratios=[1.], scales=[4.])))


@pytest.mark.parametrize("call", [
    lambda: anchor_grid([(2, 2)], strides=[8, 16], ratios=[1.], scales=[1.]),
    lambda: anchor_grid([(2, 2)], strides=[8], ratios=[1.]),
    lambda: anchor_grid([(2, 2)], strides=[8], ratios=[1.], scales=[1.], octave_base_scale=4,
                        scales_per_octave=1),
    lambda: anchor_grid([(2, 0)], strides=[8], ratios=[1.], scales=[1.]),
    lambda: anchor_grid([(2, 2.5)], strides=[8], ratios=[1.], scales=[1.]),
    lambda: anchor_grid([(2, 2)], strides=[8], ratios=[1.], scales=[1.], center_offset=2.),
    lambda: anchor_grid([(2, 2)], strides=[-8], ratios=[1.], scales=[1.]),
    lambda: ssd_anchor_grid(SSD300_FEATS, input_size=400, basesize_ratio_range=(0.15, 0.9),
                            strides=SSD300["strides"], ratios=SSD300["ratios"]),
    # (0.15, 0.25) steps by 2% and gives 7 levels for 6 strides (mmdetection asserts).
    lambda: ssd_anchor_grid(SSD300_FEATS, **dict(SSD300, basesize_ratio_range=(0.15, 0.25))),
    lambda: ssd_anchor_grid(SSD300_FEATS, **dict(SSD300, basesize_ratio_range=(0.15, 1))),
    lambda: valid_flags([(2, 2)], (1, 2, 3), strides=[8]),
    lambda: level_counts([(2, 2)], [1, 2]),
])
def test_bad_arguments_raise_value_error(call):
  with pytest.raises(ValueError):
    call()
