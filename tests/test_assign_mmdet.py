"""atss_assign against mmdetection 3.3's ATSSAssigner on random scenes at 800x1216.

Anchors and valid flags come from mmdetection's own AnchorGenerator; mmdetection's side is
called as its ATSSHead calls it (invalid anchors removed first, anchors per level recounted).
"""
import functools

import jax
import numpy as np
import pytest

from jaxdet.assigners.atss import atss_assign, atss_assign_dense

import mmdet_compat

pytestmark = pytest.mark.torch

IMAGE_HW = (800, 1216)
STRIDES = (8, 16, 32, 64, 128)
PAD_GT = 128


@pytest.fixture(scope='module')
def mmdet():
  """mmdetection's pieces (mmcv-lite has no compiled ops: stub their loader)."""
  torch = pytest.importorskip('torch')
  mmdet_compat.stub_compiled_ops()
  assigners = pytest.importorskip('mmdet.models.task_modules.assigners')
  generators = pytest.importorskip('mmdet.models.task_modules.prior_generators')
  structures = pytest.importorskip('mmengine.structures')
  generator = generators.AnchorGenerator(strides=list(STRIDES), ratios=[1.0],
                                         octave_base_scale=8, scales_per_octave=1)
  sizes = [(-(-IMAGE_HW[0] // s), -(-IMAGE_HW[1] // s)) for s in STRIDES]
  anchors = torch.cat(generator.grid_priors(sizes, device='cpu')).numpy()
  return dict(torch=torch, assigner=assigners.ATSSAssigner(topk=9), generator=generator,
              sizes=tuple(sizes), anchors=anchors, InstanceData=structures.InstanceData)


def random_scene(rng, num_gt):
  """COCO-like boxes (sides 1..900 px, log-uniform), some crossing the image border, some
  duplicated, padded to PAD_GT with NaN rows at random positions; a padded area smaller than
  the batch's."""
  h, w = IMAGE_HW
  size = np.exp(rng.uniform(0, np.log(900), (num_gt, 2)))
  centre = rng.uniform(-0.05, 1.05, (num_gt, 2)) * [w, h]
  boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
  boxes = np.clip(boxes, -20, [w + 20, h + 20, w + 20, h + 20]).astype(np.float32)
  boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 0.5)
  boxes[1::7] = boxes[0:len(boxes) - 1:7]  # exact duplicates: equal IoUs, torch.max's first
  rows = np.sort(rng.choice(PAD_GT, num_gt, replace=False))
  gt = np.full((PAD_GT, 4), np.nan, np.float32)
  gt[rows] = boxes
  mask = np.zeros(PAD_GT, bool)
  mask[rows] = True
  labels = rng.integers(0, 80, PAD_GT).astype(np.int64)
  pad_hw = (int(rng.integers(500, h + 1)), int(rng.integers(700, w + 1)))
  return gt, labels, mask, rows, pad_hw


def mmdet_assign(mmdet, gt, labels, rows, valid):
  """ATSSHead's call: drop invalid anchors, recount per level, assign, map back."""
  torch = mmdet['torch']
  counts = [h * w for h, w in mmdet['sizes']]
  level_of = np.repeat(np.arange(len(counts)), counts)
  priors = mmdet['InstanceData'](priors=torch.from_numpy(mmdet['anchors'][valid]))
  gts = mmdet['InstanceData'](bboxes=torch.from_numpy(gt[rows]),
                              labels=torch.from_numpy(labels[rows]))
  level_counts = np.bincount(level_of[valid], minlength=len(counts)).tolist()
  result = mmdet['assigner'].assign(priors, level_counts, gts)
  inds = result.gt_inds.numpy()  # 0 background, i + 1 for real gt i
  gt_index = np.full(len(valid), -2)
  gt_index[valid] = np.where(inds > 0, rows[np.maximum(inds - 1, 0)], -1)
  label = np.full(len(valid), -1)
  label[valid] = result.labels.numpy()
  max_overlap = np.zeros(len(valid), np.float32)
  max_overlap[valid] = result.max_overlaps.numpy()
  return gt_index, label, max_overlap


@functools.lru_cache(maxsize=None)
def jitted(sizes, grid):
  if grid:
    return jax.jit(functools.partial(atss_assign, featmap_sizes=sizes))
  return jax.jit(functools.partial(atss_assign_dense,
                                   num_level_anchors=tuple(h * w for h, w in sizes)))


@pytest.mark.parametrize('grid', [True, False], ids=['grid', 'dense'])
def test_atss_assign_equals_mmdet(mmdet, grid):
  rng = np.random.default_rng(2024 + grid)
  fn = jitted(mmdet['sizes'], grid)
  num_gts = (1, 2, 9, 37, 64, 100, 100) if grid else (5, 100)
  positives = 0
  for num_gt in num_gts:
    gt, labels, mask, rows, pad_hw = random_scene(rng, num_gt)
    valid = np.concatenate([f.numpy() for f in mmdet['generator'].valid_flags(
        list(mmdet['sizes']), pad_hw, device='cpu')])
    expected = mmdet_assign(mmdet, gt, labels, rows, valid)
    out = [np.asarray(x) for x in fn(mmdet['anchors'], gt, labels.astype(np.int32), mask,
                                     valid=valid)]
    np.testing.assert_array_equal(out[0], expected[0], err_msg=f'{num_gt} gts')
    np.testing.assert_array_equal(out[1], expected[1], err_msg=f'{num_gt} gts')
    np.testing.assert_allclose(out[2], expected[2], rtol=1e-6, atol=0, err_msg=f'{num_gt} gts')
    positives += (out[0] >= 0).sum()
  assert positives > 10 * len(num_gts)
