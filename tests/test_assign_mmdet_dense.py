"""max_iou_assign and fcos_assign against mmdetection 3.3 itself (MaxIoUAssigner with the RetinaNet
and SSD settings, FCOSHead.get_targets) on random scenes, with mmdetection's own priors."""
import functools

import jax
import numpy as np
import pytest

from jaxdet.assigners.fcos import fcos_assign
from jaxdet.assigners.max_iou import max_iou_assign

import mmdet_compat

pytestmark = pytest.mark.torch
torch = pytest.importorskip('torch')
pytest.importorskip('mmdet')
pytest.importorskip('mmcv')

NUM_SLOTS = 128  # gts padded to this count


@functools.lru_cache(maxsize=None)
def mmdet():
  """mmdetection's modules; mmcv-lite has no compiled ops, so their loader is stubbed first."""
  mmdet_compat.stub_compiled_ops()
  from mmdet.models.dense_heads import FCOSHead
  from mmdet.models.task_modules.assigners import MaxIoUAssigner
  from mmdet.models.task_modules.prior_generators import AnchorGenerator, SSDAnchorGenerator
  from mmengine.structures import InstanceData
  return dict(FCOSHead=FCOSHead, MaxIoUAssigner=MaxIoUAssigner, AnchorGenerator=AnchorGenerator,
              SSDAnchorGenerator=SSDAnchorGenerator, InstanceData=InstanceData)


def random_scene(rng, height, width, num_real):
  """Real-valued boxes of many sizes, some integer-aligned and duplicated (ties), padded."""
  size = np.exp(rng.uniform(np.log(4), np.log(0.8 * min(height, width)), (num_real, 2)))
  xy = rng.uniform(0, 1, (num_real, 2)) * ([width, height] - size)
  boxes = np.concatenate([xy, xy + size], 1)
  boxes[: num_real // 3] = np.round(boxes[: num_real // 3])
  if num_real >= 4:
    boxes[-1] = boxes[0]
  boxes = boxes.astype(np.float32)
  labels = rng.integers(0, 80, num_real).astype(np.int32)
  slots = np.sort(rng.choice(NUM_SLOTS, num_real, replace=False))
  gt_boxes = rng.normal(0, 1e3, (NUM_SLOTS, 4)).astype(np.float32)
  gt_labels = np.full(NUM_SLOTS, -7, np.int32)
  gt_mask = np.zeros(NUM_SLOTS, bool)
  gt_boxes[slots], gt_labels[slots], gt_mask[slots] = boxes, labels, True
  return gt_boxes, gt_labels, gt_mask


def instances(gt_boxes, gt_labels, gt_mask):
  data = mmdet()['InstanceData']()
  data.bboxes = torch.from_numpy(gt_boxes[gt_mask])
  data.labels = torch.from_numpy(gt_labels[gt_mask]).long()
  return data


def featmap_sizes(height, width, strides):
  return [(-(-height // s), -(-width // s)) for s in strides]


def check_max_iou(anchors, valid, scenes, settings):
  """Our assignment of each scene equals mmdetection's on the valid anchors."""
  fn = jax.jit(jax.vmap(lambda g, l, m: max_iou_assign(anchors, g, l, m, valid=valid,
                                                       **settings)))
  gt_boxes, gt_labels, gt_mask = (np.stack(x) for x in zip(*scenes))
  out = fn(gt_boxes, gt_labels, gt_mask)
  assigner = mmdet()['MaxIoUAssigner'](**settings)
  priors = mmdet()['InstanceData']()
  priors.priors = torch.from_numpy(anchors[valid])
  total_pos = 0
  for b, scene in enumerate(scenes):
    want = assigner.assign(priors, instances(*scene))
    gt_ids = np.flatnonzero(scene[2])
    inds = want.gt_inds.numpy()
    want_index = np.where(inds > 0, gt_ids[np.maximum(inds - 1, 0)], np.where(inds == 0, -1, -2))
    np.testing.assert_array_equal(np.asarray(out.gt_index[b])[valid], want_index)
    np.testing.assert_array_equal(np.asarray(out.gt_index[b])[~valid], -2)
    np.testing.assert_array_equal(np.asarray(out.labels[b])[valid], want.labels.numpy())
    np.testing.assert_array_equal(np.asarray(out.max_overlap[b])[valid],
                                  want.max_overlaps.numpy())
    total_pos += (inds > 0).sum()
  assert total_pos > 0


def test_max_iou_retinanet_equals_mmdet():
  height, width, pad_h, pad_w = 800, 1216, 800, 1216
  strides = [8, 16, 32, 64, 128]
  generator = mmdet()['AnchorGenerator'](octave_base_scale=4, scales_per_octave=3,
                                         ratios=[0.5, 1.0, 2.0], strides=strides)
  sizes = featmap_sizes(pad_h, pad_w, strides)
  anchors = torch.cat(generator.grid_priors(sizes, device='cpu')).numpy()
  assert anchors.shape == (182403, 4)
  rng = np.random.default_rng(0)
  # Image 1 fills the padded batch; the others are smaller, so some anchors are invalid.
  valid = torch.cat(generator.valid_flags(sizes, (700, 1000), device='cpu')).numpy()
  assert 0 < valid.sum() < len(valid)
  settings = dict(pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0)
  check_max_iou(anchors, np.ones(len(anchors), bool),
                [random_scene(rng, height, width, n) for n in (1, 100)], settings)
  check_max_iou(anchors, valid, [random_scene(rng, 700, 1000, n) for n in (37, 100)], settings)


@pytest.mark.parametrize('input_size', [300, 512])
def test_max_iou_ssd_equals_mmdet(input_size):
  if input_size == 300:
    kw = dict(basesize_ratio_range=(0.15, 0.9), strides=[8, 16, 32, 64, 100, 300],
              ratios=[[2], [2, 3], [2, 3], [2, 3], [2], [2]])
    sizes = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]
  else:
    kw = dict(basesize_ratio_range=(0.1, 0.9), strides=[8, 16, 32, 64, 128, 256, 512],
              ratios=[[2], [2, 3], [2, 3], [2, 3], [2, 3], [2], [2]])
    sizes = [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
  generator = mmdet()['SSDAnchorGenerator'](scale_major=False, input_size=input_size, **kw)
  anchors = torch.cat(generator.grid_priors(sizes, device='cpu')).numpy()
  rng = np.random.default_rng(input_size)
  settings = dict(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0., gt_max_assign_all=False)
  scenes = [random_scene(rng, input_size, input_size, n) for n in (1, 5, 30, 100)]
  check_max_iou(anchors, np.ones(len(anchors), bool), scenes, settings)


@pytest.mark.parametrize('center_sampling,norm_on_bbox', [(False, False), (True, True)])
def test_fcos_targets_equal_mmdet(center_sampling, norm_on_bbox):
  height, width = 800, 1216
  strides = (8, 16, 32, 64, 128)
  head = mmdet()['FCOSHead'](num_classes=80, in_channels=32, feat_channels=32, stacked_convs=1,
                             norm_cfg=None, strides=list(strides),
                             center_sampling=center_sampling, norm_on_bbox=norm_on_bbox)
  level_points = head.prior_generator.grid_priors(featmap_sizes(height, width, strides),
                                                  dtype=torch.float32, device='cpu')
  counts = tuple(len(p) for p in level_points)
  points = torch.cat(level_points).numpy()
  assert len(points) == 20267
  rng = np.random.default_rng(int(center_sampling))
  scenes = [random_scene(rng, height, width, n) for n in (1, 12, 100)]
  gt_boxes, gt_labels, gt_mask = (np.stack(x) for x in zip(*scenes))
  fn = jax.jit(jax.vmap(lambda g, l, m: fcos_assign(
      points, g, l, m, num_level_points=counts, strides=strides,
      regress_ranges=head.regress_ranges, center_sampling=center_sampling,
      norm_on_bbox=norm_on_bbox)))
  out = fn(gt_boxes, gt_labels, gt_mask)

  labels, targets = head.get_targets(level_points, [instances(*s) for s in scenes])
  batch = len(scenes)
  # mmdetection returns per level, images concatenated: regroup per image.
  labels = torch.cat([l.view(batch, -1) for l in labels], 1).numpy()
  targets = torch.cat([t.view(batch, -1, 4) for t in targets], 1)
  assert (labels != 80).sum() > 50
  for b in range(batch):
    positive = labels[b] != 80
    np.testing.assert_array_equal(np.asarray(out.labels[b]), np.where(positive, labels[b], -1))
    np.testing.assert_array_equal(np.asarray(out.bbox_targets[b])[positive],
                                  targets[b][positive].numpy())
    np.testing.assert_allclose(np.asarray(out.centerness_targets[b])[positive],
                               head.centerness_target(targets[b][positive]).numpy(), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.centerness_targets[b])[~positive], 0.)
