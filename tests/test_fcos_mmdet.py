"""fcos_loss against mmdetection 3.3's FCOSHead.loss_by_feat on random outputs and scenes (the
default head, centre sampling + norm_on_bbox, an image without gts, a batch without positives)."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxdet.models.heads.fcos_head import fcos_loss

import mmdet_compat

pytestmark = pytest.mark.torch
torch = pytest.importorskip('torch')
pytest.importorskip('mmdet')
pytest.importorskip('mmcv')

INF = 1e8
STRIDES = (8, 16, 32)
RANGES = ((-1, 24), (24, 48), (48, INF))
HEIGHT, WIDTH = 96, 128
SIZES = [(HEIGHT // s, WIDTH // s) for s in STRIDES]
NUM_CLASSES = 5
MAX_GT = 6


@functools.lru_cache(maxsize=None)
def mmdet():
  """mmdetection's FCOSHead; mmcv-lite has no compiled ops, so their loader is stubbed first."""
  mmdet_compat.stub_compiled_ops()
  from mmdet.models.dense_heads import FCOSHead
  from mmengine.structures import InstanceData
  return FCOSHead, InstanceData


def _scene(rng, num_gt):
  size = np.exp(rng.uniform(np.log(6), np.log(90), (num_gt, 2)))
  xy = rng.uniform(0, 1, (num_gt, 2)) * ([WIDTH, HEIGHT] - np.minimum(size, [WIDTH, HEIGHT]))
  boxes = np.zeros((MAX_GT, 4), np.float32)
  labels = np.zeros(MAX_GT, np.int32)
  mask = np.zeros(MAX_GT, bool)
  boxes[:num_gt] = np.concatenate([xy, xy + size], 1)
  labels[:num_gt] = rng.integers(0, NUM_CLASSES, num_gt)
  mask[:num_gt] = True
  return boxes, labels, mask


def _compare(seed, num_gts, **options):
  FCOSHead, InstanceData = mmdet()
  rng = np.random.default_rng(seed)
  scenes = [_scene(rng, n) for n in num_gts]
  batch = {k: jnp.asarray(np.stack([s[i] for s in scenes]))
           for i, k in enumerate(('gt_boxes', 'gt_labels', 'gt_mask'))}
  b = len(num_gts)
  cls = [rng.normal(-2, 1.5, (b, h, w, NUM_CLASSES)).astype(np.float32) for h, w in SIZES]
  reg = [rng.normal(1.5, 1.0, (b, h, w, 4)).astype(np.float32) for h, w in SIZES]
  ctr = [rng.normal(0, 1, (b, h, w, 1)).astype(np.float32) for h, w in SIZES]
  cfg = ml_collections.ConfigDict(dict(
      strides=STRIDES, regress_ranges=RANGES, focal_alpha=0.25, focal_gamma=2.0,
      loss_cls_weight=1.0, loss_bbox_weight=1.0, loss_centerness_weight=1.0,
      center_sampling=False, center_sample_radius=1.5, norm_on_bbox=False))
  cfg.update(options)
  ours = jax.jit(lambda c, r, z: fcos_loss((c, r, z), batch, cfg))(tuple(cls), tuple(reg),
                                                                    tuple(ctr))

  head = FCOSHead(num_classes=NUM_CLASSES, in_channels=8, feat_channels=8, stacked_convs=1,
                  strides=STRIDES, regress_ranges=RANGES,
                  norm_cfg=dict(type='GN', num_groups=4, requires_grad=True), **options)
  nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  # mmdetection's forward_single turns the scaled output into distances before the loss.
  dist = [torch.relu(nchw(r)) if options.get('norm_on_bbox') else torch.exp(nchw(r))
          for r in reg]
  gts = []
  for boxes, labels, mask in scenes:
    data = InstanceData()
    data.bboxes = torch.from_numpy(boxes[mask])
    data.labels = torch.from_numpy(labels[mask]).long()
    gts.append(data)
  with torch.no_grad():
    theirs = head.loss_by_feat([nchw(c) for c in cls], dist, [nchw(z) for z in ctr], gts,
                               [dict(img_shape=(HEIGHT, WIDTH))] * b)
  for k in ('loss_cls', 'loss_bbox', 'loss_centerness'):
    np.testing.assert_allclose(float(ours[k]), float(theirs[k]), rtol=2e-5, atol=1e-7,
                               err_msg=k)
  return ours


@pytest.mark.parametrize('seed', [0, 1])
def test_loss_equals_mmdetection(seed):
  out = _compare(seed, (5, 2, 0))           # the last image has no gts
  assert float(out['num_pos']) > 0


def test_loss_equals_mmdetection_center_sampling_norm_on_bbox():
  _compare(3, (4, 6), center_sampling=True, center_sample_radius=1.5, norm_on_bbox=True)


def test_loss_equals_mmdetection_without_positives():
  out = _compare(4, (0, 0))
  assert float(out['num_pos']) == 0 and float(out['loss_bbox']) == 0
