"""jaxdet.priors against mmdetection 3.3's own prior generators: exact float32 equality."""
import numpy as np
import pytest

import mmdet_compat

torch = pytest.importorskip("torch")
pytest.importorskip("mmdet")
mmdet_compat.stub_compiled_ops()
generators = pytest.importorskip("mmdet.models.task_modules.prior_generators")

from jaxdet.priors import (anchor_grid, point_grid, ssd_anchor_grid,  # noqa: E402
                           ssd_num_base_anchors, valid_flags)

pytestmark = pytest.mark.torch

FPN_STRIDES = [8, 16, 32, 64, 128]
# 800x1216 and a few other inputs (feature sizes of a stride-8..128 FPN).
FPN_FEATS = {
    "800x1216": [(100, 152), (50, 76), (25, 38), (13, 19), (7, 10)],
    "640x1088": [(80, 136), (40, 68), (20, 34), (10, 17), (5, 9)],
    "96x160": [(12, 20), (6, 10), (3, 5), (2, 3), (1, 2)],
}
RETINANET = dict(strides=FPN_STRIDES, ratios=[0.5, 1.0, 2.0], octave_base_scale=4,
                 scales_per_octave=3)
ATSS = dict(strides=FPN_STRIDES, ratios=[1.0], octave_base_scale=8, scales_per_octave=1)
SSD = {
    300: dict(input_size=300, basesize_ratio_range=(0.15, 0.9), strides=[8, 16, 32, 64, 100, 300],
              ratios=[[2], [2, 3], [2, 3], [2, 3], [2], [2]]),
    512: dict(input_size=512, basesize_ratio_range=(0.1, 0.9),
              strides=[8, 16, 32, 64, 128, 256, 512],
              ratios=[[2], [2, 3], [2, 3], [2, 3], [2, 3], [2], [2]]),
}
SSD_FEATS = {300: [(s, s) for s in (38, 19, 10, 5, 3, 1)],
             512: [(s, s) for s in (64, 32, 16, 8, 4, 2, 1)]}


def cat(tensors):
  return torch.cat(list(tensors)).numpy()


def assert_same(got, want):
  got = np.asarray(got)
  assert got.dtype == want.dtype and got.shape == want.shape
  assert np.array_equal(got, want), np.abs(got - want).max()


@pytest.mark.parametrize("feats", FPN_FEATS.values(), ids=FPN_FEATS.keys())
@pytest.mark.parametrize("cfg", [RETINANET, ATSS], ids=["retinanet", "atss"])
def test_anchor_generator(cfg, feats):
  gen = generators.AnchorGenerator(**cfg)
  assert_same(anchor_grid(feats, **cfg), cat(gen.grid_priors(feats, device="cpu")))


@pytest.mark.parametrize("feats", FPN_FEATS.values(), ids=FPN_FEATS.keys())
@pytest.mark.parametrize("pad", [(800, 1216), (777, 1001), (100, 1216), (33, 65), (1, 1)])
def test_anchor_valid_flags(feats, pad):
  gen = generators.AnchorGenerator(**RETINANET)
  got = valid_flags(feats, pad, strides=FPN_STRIDES, num_base_priors=9)
  assert_same(got, cat(gen.valid_flags(feats, pad, device="cpu")))


def test_anchor_generator_options():
  cfg = dict(strides=[(8, 16), 16], ratios=[0.5, 2.0], scales=[1.0, 1.5], base_sizes=[10, 20],
             center_offset=0.5)
  feats = [(5, 7), (3, 4)]
  for scale_major in (True, False):
    gen = generators.AnchorGenerator(scale_major=scale_major, **cfg)
    assert_same(anchor_grid(feats, scale_major=scale_major, **cfg),
                cat(gen.grid_priors(feats, device="cpu")))


@pytest.mark.parametrize("size", [300, 512])
def test_ssd_anchor_generator(size):
  cfg = SSD[size]
  gen = generators.SSDAnchorGenerator(scale_major=False, **cfg)  # as mmdetection's configs
  assert list(ssd_num_base_anchors(cfg["ratios"])) == gen.num_base_anchors
  feats = SSD_FEATS[size]
  assert_same(ssd_anchor_grid(feats, **cfg), cat(gen.grid_priors(feats, device="cpu")))
  gen_major = generators.SSDAnchorGenerator(scale_major=True, **cfg)
  assert_same(ssd_anchor_grid(feats, scale_major=True, **cfg),
              cat(gen_major.grid_priors(feats, device="cpu")))
  pad = (size - 37, size)
  assert_same(valid_flags(feats, pad, strides=cfg["strides"],
                          num_base_priors=ssd_num_base_anchors(cfg["ratios"])),
              cat(gen.valid_flags(feats, pad, device="cpu")))


def test_ssd300_voc_range():
  cfg = dict(SSD[300], basesize_ratio_range=(0.2, 0.9))
  gen = generators.SSDAnchorGenerator(scale_major=False, **cfg)
  assert_same(ssd_anchor_grid(SSD_FEATS[300], **cfg),
              cat(gen.grid_priors(SSD_FEATS[300], device="cpu")))


@pytest.mark.parametrize("feats", FPN_FEATS.values(), ids=FPN_FEATS.keys())
@pytest.mark.parametrize("offset,with_stride", [(0.5, False), (0.5, True), (0.0, False)])
def test_point_generator(feats, offset, with_stride):
  gen = generators.MlvlPointGenerator(FPN_STRIDES, offset=offset)
  want = cat(gen.grid_priors(feats, device="cpu", with_stride=with_stride))
  assert_same(point_grid(feats, strides=FPN_STRIDES, offset=offset, with_stride=with_stride),
              want)
  pad = (790, 1199)
  assert_same(valid_flags(feats, pad, strides=FPN_STRIDES),
              cat(gen.valid_flags(feats, pad, device="cpu")))


def test_point_generator_odd_strides_and_offset():
  strides, feats = [12, (20, 100), 300], [(9, 13), (5, 7), (2, 3)]
  gen = generators.MlvlPointGenerator(strides, offset=0.3)
  assert_same(point_grid(feats, strides=strides, offset=0.3, with_stride=True),
              cat(gen.grid_priors(feats, device="cpu", with_stride=True)))
