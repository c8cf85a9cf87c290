"""DETR against mmdetection 3.3 itself: positional encoding, padding mask, the transformer + head
outputs of all six decoder layers, the Hungarian matching, the 18 loss terms and the detections.

mmdetection's DETR is built from its shipped config (random init, `DETR.init_weights`, then random
biases and LayerNorm affines so that no term is trivially zero); its weights go into jaxdet's head
by `detr_head.TORCH_NAMES` (the name table that conversion uses). mmcv-lite has no compiled ops:
its loader is stubbed (DETR needs none).
"""
import logging
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxdet.assigners import detr_match_cost
from jaxdet.models.heads import detr_head
from jaxdet.models.heads.detr_head import DETRHead, detr_predict, padding_mask
from jaxdet.models.heads.detr_loss import detr_cost, detr_loss, match
from jaxdet.models.layers.positional_encoding import sine_positional_encoding

import mmdet_compat

pytestmark = pytest.mark.torch

torch = pytest.importorskip('torch')

NUM_CLASSES = 80
INPUT_HW = (200, 300)                 # the padded batch
IMG_SHAPES = ((200, 300), (150, 221))  # the second image is padded bottom and right
FEAT_HW = (7, 10)                     # ceil(INPUT_HW / 32)


@pytest.fixture(scope='module')
def mm():
  mm = mmdet_compat.mmdet()
  logging.getLogger('mmengine').setLevel(logging.WARNING)  # init_weights' per-tensor report
  torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
  model, _ = mmdet_compat.build_model('detr/detr_r50_8xb2-150e_coco.py', seed=0)
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.startswith(('backbone.', 'neck.')):
        continue
      if name.endswith('bias') or (p.ndim == 1 and 'norm' in name):
        base = 1. if name.endswith('weight') else 0.
        p.copy_(base + 0.2 * (torch.rand(p.shape, generator=gen) - 0.5))
  model.eval()
  return dict(model=model, DetDataSample=mm['DetDataSample'], InstanceData=mm['InstanceData'])


def head_params_from_torch(state_dict):
  """jaxdet head params from an mmdetection DETR state_dict, by `detr_head.TORCH_NAMES`."""
  rules = [(re.compile(p), t) for p, t in detr_head.TORCH_NAMES]
  params = {}
  for name, value in state_dict.items():
    if name.startswith(('backbone.', 'neck.')):
      continue
    module, _, leaf = name.rpartition('.')
    path = next((m.expand(t) for r, t in rules for m in [r.fullmatch(module)] if m), None)
    assert path is not None, f'no jaxdet name for {name}'
    value = value.detach().numpy()
    if leaf == 'in_proj_weight':
      path, leaf, value = path + '/in_proj', 'kernel', value.T
    elif leaf == 'in_proj_bias':
      path, leaf = path + '/in_proj', 'bias'
    elif module == 'query_embedding':
      leaf = 'embedding'
    elif leaf == 'weight':
      leaf, value = ('kernel', value.T) if value.ndim == 2 else ('scale', value)
    node = params
    for part in path.split('/'):
      node = node.setdefault(part, {})
    assert leaf not in node, name
    node[leaf] = jnp.asarray(value)
  return params


def samples(mm, img_shapes, scale_factor=(1., 1.)):
  out = []
  for hw in img_shapes:
    s = mm['DetDataSample']()
    s.set_metainfo(dict(img_shape=hw, batch_input_shape=INPUT_HW, pad_shape=INPUT_HW,
                        ori_shape=hw, scale_factor=scale_factor))
    out.append(s)
  return out


def _rel(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-12))


# --------------------------------------------------------------------------------- pieces

def test_positional_encoding_matches_mmdet(mm):
  from mmdet.models.layers import SinePositionalEncoding
  rng = np.random.default_rng(0)
  mask = np.ones((3, 9, 13), bool)
  for b, (h, w) in enumerate(((9, 13), (5, 7), (1, 2))):
    mask[b, :h, :w] = False
  mask[2] = rng.random((9, 13)) < 0.3      # any mask, not only a padded rectangle
  expected = SinePositionalEncoding(num_feats=128, normalize=True)(torch.from_numpy(mask))
  actual = sine_positional_encoding(jnp.asarray(mask))
  np.testing.assert_allclose(actual, expected.numpy().transpose(0, 2, 3, 1), atol=2e-6)


@pytest.mark.parametrize('input_hw,feat_hw', [((200, 300), (7, 10)), ((800, 1199), (25, 38)),
                                              ((333, 517), (11, 17)), ((64, 64), (64, 64)),
                                              ((30, 50), (60, 100)), ((97, 61), (13, 8))])
def test_padding_mask_matches_torch_interpolate(input_hw, feat_hw):
  """mmdetection's mask: ones at the padded input size, zeros on each image, F.interpolate."""
  rng = np.random.default_rng(sum(input_hw))
  img_shapes = np.stack([rng.integers(1, input_hw[0] + 1, 6),
                         rng.integers(1, input_hw[1] + 1, 6)], 1).astype(np.int32)
  img_shapes[0] = input_hw
  full = torch.ones((6,) + input_hw)
  for i, (h, w) in enumerate(img_shapes):
    full[i, :h, :w] = 0
  expected = torch.nn.functional.interpolate(full[:, None], size=feat_hw)[:, 0].bool().numpy()
  np.testing.assert_array_equal(padding_mask(img_shapes, input_hw, feat_hw), expected)


# ---------------------------------------------------------------------- network outputs

@pytest.fixture(scope='module')
def outputs(mm):
  """The same random C5-projected features through mmdetection's and jaxdet's transformer +
  head, on a padded batch of two images of different sizes."""
  model = mm['model']
  rng = np.random.default_rng(0)
  feat = rng.standard_normal((2,) + FEAT_HW + (256,)).astype(np.float32)
  with torch.no_grad():
    head_inputs = model.forward_transformer(
        (torch.from_numpy(feat.transpose(0, 3, 1, 2).copy()),), samples(mm, IMG_SHAPES))
    mm_cls, mm_box = model.bbox_head(**head_inputs)
  params = head_params_from_torch(model.state_dict())
  head = DETRHead(num_classes=NUM_CLASSES)
  init = jax.eval_shape(lambda: head.init(jax.random.key(0), (jnp.zeros((2,) + FEAT_HW + (256,)),),
                                          jnp.asarray(IMG_SHAPES), INPUT_HW))
  assert (jax.tree_util.tree_map(lambda x: tuple(x.shape), init['params'])
          == jax.tree_util.tree_map(lambda x: tuple(x.shape), params))
  jd_cls, jd_box = jax.jit(lambda p, f: head.apply({'params': p}, (f,), jnp.asarray(IMG_SHAPES),
                                                   INPUT_HW))(params, jnp.asarray(feat))
  return dict(mm=(mm_cls.numpy(), mm_box.numpy()), jd=(np.asarray(jd_cls), np.asarray(jd_box)),
              params=params, head=head)


def test_all_six_layers_match_mmdet(outputs):
  (mm_cls, mm_box), (jd_cls, jd_box) = outputs['mm'], outputs['jd']
  assert jd_cls.shape == mm_cls.shape == (6, 2, 100, NUM_CLASSES + 1)
  assert jd_box.shape == mm_box.shape == (6, 2, 100, 4)
  diffs = [(_rel(jd_cls[l], mm_cls[l]), _rel(jd_box[l], mm_box[l])) for l in range(6)]
  print('DETR vs mmdetection, max relative difference per layer (cls, box):', diffs)
  assert max(max(d) for d in diffs) < 1e-4


def test_padding_changes_the_padded_image_only(outputs, mm):
  """The mask matters: the second image, run alone without padding mask information, differs;
  the first (unpadded) image is the same as in a batch where nothing is padded."""
  head, params = outputs['head'], outputs['params']
  rng = np.random.default_rng(0)
  feat = jnp.asarray(rng.standard_normal((2,) + FEAT_HW + (256,)).astype(np.float32))
  cls_nomask, _ = head.apply({'params': params}, (feat,), jnp.asarray([INPUT_HW] * 2), INPUT_HW)
  jd_cls = outputs['jd'][0]
  np.testing.assert_allclose(cls_nomask[:, 0], jd_cls[:, 0], rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(cls_nomask[:, 1]) - jd_cls[:, 1]).max() > 1e-2


def test_detections_match_mmdet(outputs, mm):
  (mm_cls, mm_box), (jd_cls, jd_box) = outputs['mm'], outputs['jd']
  scale = (0.5, 0.75)
  metas = [s.metainfo for s in samples(mm, IMG_SHAPES, scale)]
  mm_res = mm['model'].bbox_head.predict_by_feat(torch.from_numpy(mm_cls), torch.from_numpy(mm_box),
                                                 batch_img_metas=metas, rescale=True)
  batch = dict(img_shape=np.asarray(IMG_SHAPES, np.int32),
               scale_factor=np.asarray([scale] * 2, np.float32), flip=np.zeros(2, bool))
  pred = detr_predict((jnp.asarray(jd_cls), jnp.asarray(jd_box)), batch, None,
                      ml_collections.ConfigDict(dict(max_per_img=100)))
  for i, res in enumerate(mm_res):
    order = np.argsort(-res.scores.numpy(), kind='stable')
    np.testing.assert_allclose(pred.scores[i], res.scores.numpy()[order], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(pred.labels[i], res.labels.numpy()[order])
    np.testing.assert_allclose(pred.boxes[i], res.bboxes.numpy()[order], atol=0.01)
    assert bool(pred.valid[i].all())


# ------------------------------------------------------------------------ matching, loss

def random_targets(rng, img_shapes, counts, max_gt):
  """gt boxes xyxy px inside each image (some tiny), labels; padded to max_gt rows."""
  b = len(img_shapes)
  boxes = np.zeros((b, max_gt, 4), np.float32)
  labels = np.zeros((b, max_gt), np.int32)
  mask = np.zeros((b, max_gt), bool)
  for i, ((h, w), n) in enumerate(zip(img_shapes, counts)):
    rows = np.sort(rng.choice(max_gt, n, replace=False))
    xy = rng.uniform(0, 1, (n, 2)) * [w, h]
    wh = np.exp(rng.uniform(np.log(2), np.log(0.8 * min(h, w)), (n, 2)))
    box = np.concatenate([xy - wh / 2, xy + wh / 2], 1)
    boxes[i, rows] = np.clip(box, 0, [w, h, w, h])
    labels[i, rows] = rng.integers(0, NUM_CLASSES, n)
    mask[i, rows] = True
  boxes[~mask] = rng.uniform(-5, 5, (int((~mask).sum()), 4))  # garbage in padded rows
  return boxes, labels, mask


def random_outputs(rng, num_layers, b, q):
  cls = (2 * rng.standard_normal((num_layers, b, q, NUM_CLASSES + 1))).astype(np.float32)
  box = 1 / (1 + np.exp(-rng.standard_normal((num_layers, b, q, 4))))
  return cls, box.astype(np.float32)


def gt_instances(mm, boxes, labels, mask):
  out = []
  for i in range(len(boxes)):
    inst = mm['InstanceData']()
    inst.bboxes = torch.from_numpy(boxes[i][mask[i]])
    inst.labels = torch.from_numpy(labels[i][mask[i]].astype(np.int64))
    out.append(inst)
  return out


CASES = {  # name: (img_shapes, gts per image, queries, padded gts)
    'coco-like': (((200, 300), (150, 221), (187, 300)), (5, 0, 12), 100, 16),
    'more-gts-than-queries': (((200, 300), (120, 90)), (14, 3), 10, 16),
}


@pytest.mark.parametrize('case', list(CASES))
def test_matching_and_cost_match_mmdet(mm, case):
  """Per layer and image: the cost equals the sum of mmdetection's match costs, and the matching
  equals HungarianAssigner's (scipy) query by query."""
  img_shapes, counts, q, g = CASES[case]
  rng = np.random.default_rng(1)
  cls, box = random_outputs(rng, 6, len(img_shapes), q)
  gt_b, gt_l, gt_m = random_targets(rng, img_shapes, counts, g)
  assigner = mm['model'].bbox_head.assigner
  hw = np.asarray(img_shapes, np.float32)
  factor = np.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], -1)[:, None]
  safe_b = np.where(gt_m[..., None], gt_b, 1.)
  cost = np.asarray(detr_cost(jnp.asarray(cls), jnp.asarray(box), jnp.asarray(gt_l)[None],
                              jnp.asarray(safe_b)[None], jnp.asarray(factor)[None]))
  matched = np.asarray(match(jnp.asarray(cost), jnp.asarray(gt_m)))
  worst_cost, worst_h1 = 0., 0.
  insts = gt_instances(mm, gt_b, gt_l, gt_m)
  for l in range(6):
    for i, (h, w) in enumerate(img_shapes):
      f = torch.tensor([w, h, w, h], dtype=torch.float32)
      pred_px = torch.cat([torch.from_numpy(box[l, i, :, :2] - box[l, i, :, 2:] / 2),
                           torch.from_numpy(box[l, i, :, :2] + box[l, i, :, 2:] / 2)], 1) * f
      pred = mm['InstanceData'](scores=torch.from_numpy(cls[l, i]), bboxes=pred_px)
      meta = dict(img_shape=(h, w))
      res = assigner.assign(pred_instances=pred, gt_instances=insts[i], img_meta=meta)
      rows = np.flatnonzero(gt_m[i])
      inds = res.gt_inds.numpy()
      expected = np.where(inds > 0, np.append(rows, -1)[inds - 1], -1)
      np.testing.assert_array_equal(matched[l, i], expected, err_msg=f'layer {l} image {i}')
      if len(rows):
        mm_cost = sum(c(pred_instances=pred, gt_instances=insts[i], img_meta=meta)
                      for c in assigner.match_costs).numpy()
        worst_cost = max(worst_cost, np.abs(cost[l, i][:, rows] - mm_cost).max())
        gt_norm = np.concatenate([(gt_b[i, rows, :2] + gt_b[i, rows, 2:]) / 2,
                                  gt_b[i, rows, 2:] - gt_b[i, rows, :2]], 1) / factor[i]
        h1 = detr_match_cost(cls[l, i], box[l, i], gt_l[i, rows], gt_norm)
        worst_h1 = max(worst_h1, np.abs(np.asarray(h1) - mm_cost).max())
  print(f'{case}: max |cost - mmdet cost| {worst_cost:.2e} (detr_head); '
        f'{worst_h1:.2e} (jaxdet.assigners.detr_match_cost)')
  assert worst_cost < 1e-5
  assert worst_h1 < 1e-4


@pytest.mark.parametrize('case', list(CASES))
def test_loss_matches_mmdet(mm, case):
  """All 18 terms equal DETRHead.loss_by_feat's on the same outputs and targets; an image with
  no boxes (coco-like) adds background CE only, as in mmdetection."""
  img_shapes, counts, q, g = CASES[case]
  rng = np.random.default_rng(2)
  cls, box = random_outputs(rng, 6, len(img_shapes), q)
  gt_b, gt_l, gt_m = random_targets(rng, img_shapes, counts, g)
  metas = [dict(img_shape=hw) for hw in img_shapes]
  expected = mm['model'].bbox_head.loss_by_feat(torch.from_numpy(cls), torch.from_numpy(box),
                                                gt_instances(mm, gt_b, gt_l, gt_m), metas)
  batch = dict(gt_boxes=gt_b, gt_labels=gt_l, gt_mask=gt_m,
               img_shape=np.asarray(img_shapes, np.int32),
               image_valid=np.ones(len(img_shapes), bool))
  cfg = ml_collections.ConfigDict(dict(bg_cls_weight=0.1))
  actual = jax.jit(lambda o, b: detr_loss(o, b, cfg))((cls, box), batch)
  assert len([k for k in actual if k.startswith('loss_')]) == 18 == len(expected)
  worst = 0.
  for name, value in expected.items():
    key = re.sub(r'^d(\d)\.(\w+)$', r'\2_d\1', name)
    worst = max(worst, _rel(actual[key], value.item()))
  print(f'{case}: max relative difference of the 18 loss terms {worst:.2e}')
  assert worst < 1e-5
