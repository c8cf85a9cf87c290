"""RetinaNet head (jaxdet.models.heads.retina_head): the loss on hand-made scenes, observed through
its gradients, against `max_iou_assign` and a slow numpy reference of mmdetection's rules; the
loss at a perfect prediction; a gradient step; the per-device / global normaliser; prediction;
and (torch marker) the loss against mmdetection 3.3's `RetinaHead.loss_by_feat` itself."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs._base_ import retinanet_r50_fpn
from jaxdet.assigners.max_iou import max_iou_assign
from jaxdet.models.detectors import build_detector
from jaxdet.models.heads import retina_head
from jaxdet.priors import valid_flags

import mmdet_compat

SIZE = 64                     # padded batch side (px)
STRIDES = (8, 16, 32)
SIZES = tuple((SIZE // s, SIZE // s) for s in STRIDES)
NB = 9                        # anchors per location
C = 3                         # classes
NUM_ANCHORS = sum(h * w for h, w in SIZES) * NB


def make_head_cfg(**overrides):
  cfg = retinanet_r50_fpn.get_config(num_classes=C).head
  cfg.strides = STRIDES
  cfg.update(overrides)
  return cfg


HEAD_CFG = make_head_cfg()


# ----------------------------------------------------------------------------- references

def ref_anchors():
  """mmdetection's AnchorGenerator written out (float64): level, y, x, ratio, scale order."""
  rows = []
  for (h, w), s in zip(SIZES, STRIDES):
    for y in range(h):
      for x in range(w):
        for ratio in (0.5, 1.0, 2.0):
          for k in range(3):
            scale = 4 * 2 ** (k / 3)
            hr = math.sqrt(ratio)
            ww, hh = s * scale / hr, s * scale * hr
            rows.append([x * s - ww / 2, y * s - hh / 2, x * s + ww / 2, y * s + hh / 2])
  return np.array(rows)


def ref_iou(a, b):
  """IoU of two boxes, mmdetection's `bbox_overlaps` operation by operation (float32 in, float32
  out: numpy rounds each float32 op as torch does, so exact ties stay exact ties)."""
  f = np.float32 if np.asarray(a).dtype == np.float32 else np.float64
  a, b = np.asarray(a, f), np.asarray(b, f)
  iw = max(min(a[2], b[2]) - max(a[0], b[0]), f(0))
  ih = max(min(a[3], b[3]) - max(a[1], b[1]), f(0))
  inter = iw * ih
  union = (b[2] - b[0]) * (b[3] - b[1]) + (a[2] - a[0]) * (a[3] - a[1]) - inter
  return inter / max(union, f(1e-6))


def ref_assign(anchors, gts, pad_shape, stride_of_anchor, cell_of_anchor):
  """mmdetection's MaxIoUAssigner (pos 0.5, neg 0.4, min_pos_iou 0, gt_max_assign_all) after
  dropping the anchors off the image's padded area, one anchor at a time, float32 IoUs.
  Returns (A,) int: gt index, -1 background, -2 ignored (or invalid)."""
  num = len(anchors)
  valid = [cell_of_anchor[i][0] * stride_of_anchor[i] < pad_shape[0]
           and cell_of_anchor[i][1] * stride_of_anchor[i] < pad_shape[1] for i in range(num)]
  iou = np.full((num, len(gts)), -1., np.float32)
  for i in range(num):
    if valid[i]:
      for j, g in enumerate(gts):
        iou[i, j] = ref_iou(anchors[i], g)
  out = np.full(num, -2)
  for i in range(num):
    if not valid[i]:
      continue
    best = iou[i].max()
    if 0 <= best < 0.4:
      out[i] = -1
    if best >= 0.5:
      out[i] = int(np.argmax(iou[i]))
  for j in range(len(gts)):               # low-quality matches, gt by gt, all tied anchors
    gt_best = iou[:, j].max()
    for i in range(num):
      if valid[i] and iou[i, j] == gt_best:
        out[i] = j
  return out


def anchor_cells():
  strides, cells = [], []
  for (h, w), s in zip(SIZES, STRIDES):
    for y in range(h):
      for x in range(w):
        for _ in range(NB):
          strides.append(s)
          cells.append((y, x))
  return strides, cells


def ref_encode(anchor, gt):
  pw, ph = anchor[2] - anchor[0], anchor[3] - anchor[1]
  px, py = anchor[0] + pw / 2, anchor[1] + ph / 2
  gw, gh = gt[2] - gt[0], gt[3] - gt[1]
  gx, gy = gt[0] + gw / 2, gt[1] + gh / 2
  return np.array([(gx - px) / pw, (gy - py) / ph, np.log(gw / pw), np.log(gh / ph)])


def ref_decode(anchor, d):
  pw, ph = anchor[2] - anchor[0], anchor[3] - anchor[1]
  px, py = anchor[0] + pw / 2, anchor[1] + ph / 2
  cx, cy, w, h = px + d[0] * pw, py + d[1] * ph, pw * np.exp(d[2]), ph * np.exp(d[3])
  return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


# ----------------------------------------------------------------------------- helpers

def to_levels(flat, width):
  """(B, A, width) in the anchors' order -> per-level (B, H, W, NB * width) head outputs."""
  out, start = [], 0
  for h, w in SIZES:
    n = h * w * NB
    out.append(jnp.asarray(flat[:, start:start + n].reshape(flat.shape[0], h, w, NB * width),
                           jnp.float32))
    start += n
  return tuple(out)


def from_levels(levels, width):
  return np.concatenate([np.asarray(x).reshape(x.shape[0], -1, width) for x in levels], axis=1)


def make_batch(boxes, labels, pad_shapes, max_gt=2):
  b = len(boxes)
  gt_boxes = np.zeros((b, max_gt, 4), np.float32)
  gt_boxes[..., 2:] = 1.  # padded rows: a garbage but finite box
  gt_labels = np.full((b, max_gt), -1, np.int32)
  gt_mask = np.zeros((b, max_gt), bool)
  for i, (bx, lb) in enumerate(zip(boxes, labels)):
    gt_boxes[i, :len(bx)] = bx
    gt_labels[i, :len(lb)] = lb
    gt_mask[i, :len(bx)] = True
  return dict(gt_boxes=jnp.asarray(gt_boxes), gt_labels=jnp.asarray(gt_labels),
              gt_mask=jnp.asarray(gt_mask), pad_shape=jnp.asarray(pad_shapes, jnp.int32))


@functools.lru_cache(maxsize=None)
def loss_and_grads(mode='device'):
  cfg = make_head_cfg(avg_factor=mode)

  def fn(cls_flat, reg_flat, batch):
    def total(cls_flat, reg_flat):
      out = retina_head.retina_loss((to_levels(cls_flat, C), to_levels(reg_flat, 4), None),
                                    batch, cfg)
      return out['loss_cls'] + out['loss_bbox'], out
    return jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(cls_flat, reg_flat)
  return jax.jit(fn)


# One image with a 26 x 20 box (several anchors over 0.5), one with a 7 x 6 box (no anchor
# reaches 0.5: a low-quality match only) and a padded area cut to 40 px high.
BOXES = [np.array([[13.3, 9.1, 39.4, 29.6]], np.float32),
         np.array([[30.2, 20.4, 37.3, 26.5]], np.float32)]
LABELS = [np.array([1]), np.array([2])]
PADS = [(64, 64), (40, 64)]


@pytest.fixture(scope='module')
def scene():
  batch = make_batch(BOXES, LABELS, PADS)
  rng = np.random.default_rng(0)
  cls_flat = jnp.asarray(rng.normal(-2, 1, (2, NUM_ANCHORS, C)), jnp.float32)
  reg_flat = jnp.asarray(rng.normal(0, 0.5, (2, NUM_ANCHORS, 4)), jnp.float32)
  (total, out), (g_cls, g_reg) = loss_and_grads()(cls_flat, reg_flat, batch)
  return dict(batch=batch, cls=cls_flat, reg=reg_flat, out=out, g_cls=np.asarray(g_cls),
              g_reg=np.asarray(g_reg))


# ----------------------------------------------------------------------------- tests

def test_anchors_in_mmdetection_order():
  anchors = retina_head.retina_anchors(HEAD_CFG, SIZES)
  assert anchors.shape == (NUM_ANCHORS, 4)
  np.testing.assert_allclose(np.asarray(anchors), ref_anchors(), rtol=0, atol=1e-4)


def test_loss_positives_are_max_iou_assign_and_reference(scene):
  """Read the assignment off the loss's gradients: the L1 term moves exactly the positives'
  deltas; the focal term pushes a positive's gt class up and every class of a negative down;
  ignored (incl. off-pad) anchors get no gradient at all."""
  g_cls, g_reg = scene['g_cls'], scene['g_reg']
  anchors = jnp.asarray(retina_head.retina_anchors(HEAD_CFG, SIZES))
  valid = valid_flags(SIZES, scene['batch']['pad_shape'], strides=STRIDES, num_base_priors=NB)
  np_anchors = np.asarray(anchors)   # float32, == ref_anchors() (test_anchors_in_...)
  strides, cells = anchor_cells()
  total_pos = 0
  for i in range(2):
    a = max_iou_assign(anchors, scene['batch']['gt_boxes'][i], scene['batch']['gt_labels'][i],
                       scene['batch']['gt_mask'][i], pos_iou_thr=0.5, neg_iou_thr=0.4,
                       min_pos_iou=0., valid=valid[i])
    jax_index = np.asarray(a.gt_index)
    ref_index = ref_assign(np_anchors, BOXES[i], PADS[i], strides, cells)
    np.testing.assert_array_equal(jax_index, ref_index)

    pos = np.any(g_reg[i] != 0, axis=1)
    np.testing.assert_array_equal(pos, ref_index >= 0)
    assert pos.sum() >= 1
    ignored = np.all(g_cls[i] == 0, axis=1)
    np.testing.assert_array_equal(ignored, ref_index == -2)
    neg = ref_index == -1
    assert np.all(g_cls[i][neg] > 0)
    label = LABELS[i][0]
    assert np.all(g_cls[i][pos, label] < 0)
    other = [c for c in range(C) if c != label]
    assert np.all(g_cls[i][pos][:, other] > 0)
    total_pos += pos.sum()
    if i == 1:  # the cut pad: the anchors of rows y * stride >= 40 are ignored, none positive
      off_pad = np.array([c[0] * st >= 40 for c, st in zip(cells, strides)])
      assert np.all(ignored[off_pad]) and off_pad.sum() > 0
  assert float(scene['out']['num_pos']) == total_pos


def test_loss_values_match_formulas(scene):
  """loss_bbox = sum |d - t| over positives / avg_factor, avg_factor = sum max(num_pos, 1)."""
  g_reg = scene['g_reg']
  np_anchors = ref_anchors()
  l1, avg = 0., 0.
  for i in range(2):
    pos = np.flatnonzero(np.any(g_reg[i] != 0, axis=1))
    avg += max(len(pos), 1)
    reg = np.asarray(scene['reg'][i])
    for k in pos:
      l1 += np.abs(reg[k] - ref_encode(np_anchors[k], BOXES[i][0].astype(np.float64))).sum()
  assert float(scene['out']['avg_factor']) == avg
  np.testing.assert_allclose(float(scene['out']['loss_bbox']), l1 / avg, rtol=1e-5)


def test_perfect_prediction_has_near_zero_loss(scene):
  g_reg = scene['g_reg']
  np_anchors = ref_anchors()
  cls_flat = np.full((2, NUM_ANCHORS, C), -30., np.float32)
  reg_flat = np.zeros((2, NUM_ANCHORS, 4), np.float32)
  for i in range(2):
    for k in np.flatnonzero(np.any(g_reg[i] != 0, axis=1)):
      cls_flat[i, k, LABELS[i][0]] = 30.
      reg_flat[i, k] = ref_encode(np_anchors[k], BOXES[i][0].astype(np.float64))
  (total, out), _ = loss_and_grads()(jnp.asarray(cls_flat), jnp.asarray(reg_flat),
                                     scene['batch'])
  assert float(out['loss_cls']) < 1e-9
  assert float(out['loss_bbox']) < 1e-5
  assert float(out['num_pos']) > 0
  # and the random prediction of the scene is far from it
  assert float(scene['out']['loss_cls']) > 0.1 and float(scene['out']['loss_bbox']) > 0.1


def test_gradient_step_moves_boxes_to_gt_and_raises_scores(scene):
  """One small gradient-descent step on the raw outputs: every positive's decoded box gets
  closer to its gt (corner L1 distance), its gt-class logit rises, both losses fall."""
  np_anchors = ref_anchors()
  cls0, reg0 = np.asarray(scene['cls']), np.asarray(scene['reg'])
  avg = float(scene['out']['avg_factor'])
  lr = 0.002 * avg   # each L1 gradient entry is +-1 / avg_factor: every delta moves by 0.002
  cls1 = cls0 - lr * scene['g_cls']
  reg1 = reg0 - lr * scene['g_reg']
  (_, out1), _ = loss_and_grads()(jnp.asarray(cls1), jnp.asarray(reg1), scene['batch'])
  assert float(out1['loss_bbox']) < float(scene['out']['loss_bbox'])
  assert float(out1['loss_cls']) < float(scene['out']['loss_cls'])
  num = 0
  for i in range(2):
    gt = BOXES[i][0].astype(np.float64)
    label = LABELS[i][0]
    for k in np.flatnonzero(np.any(scene['g_reg'][i] != 0, axis=1)):
      before = np.abs(ref_decode(np_anchors[k], reg0[i, k]) - gt).sum()
      after = np.abs(ref_decode(np_anchors[k], reg1[i, k]) - gt).sum()
      assert after < before, (i, k, before, after)
      assert cls1[i, k, label] > cls0[i, k, label]
      num += 1
  assert num == float(scene['out']['num_pos'])


@pytest.mark.parametrize('mode', ['device', 'global'])
def test_avg_factor_device_vs_global(scene, mode):
  """Two "devices" (vmap with an axis name), one image each with different positive counts.
  'device': each device divides by its own positives, as if alone (mmdetection's AnchorHead);
  'global': by the mean over devices, so the mean of the two losses is the one-device loss of
  both images."""
  cfg = make_head_cfg(avg_factor=mode)
  batch = scene['batch']
  cls_out = to_levels(np.asarray(scene['cls']), C)
  reg_out = to_levels(np.asarray(scene['reg']), 4)
  split = lambda tree: jax.tree_util.tree_map(lambda x: x[:, None], tree)  # (dev, 1, ...)

  def per_device(cls_out, reg_out, batch):
    return retina_head.retina_loss((cls_out, reg_out, None), batch, cfg, axis_name='dev')
  two = jax.jit(jax.vmap(per_device, axis_name='dev'))(split(cls_out), split(reg_out),
                                                       split(batch))
  alone = [retina_head.retina_loss(
      jax.tree_util.tree_map(lambda x: x[i:i + 1], (cls_out, reg_out)) + (None,),
      jax.tree_util.tree_map(lambda x: x[i:i + 1], batch), cfg) for i in range(2)]
  together = retina_head.retina_loss((cls_out, reg_out, None), batch, cfg)

  own = np.array([float(a['avg_factor']) for a in alone])
  assert own[0] != own[1]                         # the devices have different positives
  np.testing.assert_array_equal(np.asarray(two['num_pos']), [float(a['num_pos']) for a in alone])
  for key in ('loss_cls', 'loss_bbox'):
    per_dev = np.asarray(two[key])
    if mode == 'device':
      np.testing.assert_array_equal(np.asarray(two['avg_factor']), own)
      np.testing.assert_allclose(per_dev, [float(a[key]) for a in alone], rtol=1e-6)
      assert not np.isclose(per_dev.mean(), float(together[key]), rtol=1e-3)
    else:
      np.testing.assert_allclose(np.asarray(two['avg_factor']), [own.mean()] * 2)
      np.testing.assert_allclose(per_dev, [float(a[key]) * o / own.mean()
                                           for a, o in zip(alone, own)], rtol=1e-5)
      np.testing.assert_allclose(per_dev.mean(), float(together[key]), rtol=1e-5)


def test_unknown_avg_factor_is_an_error(scene):
  with pytest.raises(ValueError, match="avg_factor='bogus'"):
    retina_head.retina_loss((to_levels(np.asarray(scene['cls']), C),
                             to_levels(np.asarray(scene['reg']), 4), None), scene['batch'],
                            make_head_cfg(avg_factor='bogus'))


def test_predict_one_confident_anchor_in_original_pixels():
  """One anchor with a high score and known deltas -> exactly its decoded box, mapped back to
  the original image (scale 2x, then a horizontal flip for the second image)."""
  det_cfg = retinanet_r50_fpn.get_config(num_classes=C)
  det_cfg.head.strides = STRIDES
  np_anchors = ref_anchors()
  (y, x), base = (3, 4), 0                # level 0 (stride 8), ratio 0.5, scale 4: 45 x 23 px
  k = (y * SIZES[0][1] + x) * NB + base
  deltas = np.array([0.1, -0.2, 0.3, 0.1], np.float32)
  cls_flat = np.full((2, NUM_ANCHORS, C), -10., np.float32)
  cls_flat[:, k, 2] = 3.
  reg_flat = np.zeros((2, NUM_ANCHORS, 4), np.float32)
  reg_flat[:, k] = deltas
  batch = dict(img_shape=jnp.asarray([[60, 62], [60, 62]], jnp.float32),
               scale_factor=jnp.asarray([[2., 2.], [2., 2.]], jnp.float32),
               offset=jnp.zeros((2, 2), jnp.float32), flip=jnp.asarray([False, True]))
  pred = retina_head.retina_predict((to_levels(cls_flat, C), to_levels(reg_flat, 4), None),
                                    batch, det_cfg.head, det_cfg.test_cfg)
  box = ref_decode(np_anchors[k], deltas.astype(np.float64))
  box = np.clip(box, 0, [62, 60, 62, 60])            # clipped to img_shape (w, h)
  flipped = np.array([62 - box[2], box[1], 62 - box[0], box[3]])
  for i, expected in enumerate((box, flipped)):
    assert int(np.asarray(pred.valid[i]).sum()) == 1
    assert int(pred.labels[i, 0]) == 2
    np.testing.assert_allclose(float(pred.scores[i, 0]), 1 / (1 + math.exp(-3.)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(pred.boxes[i, 0]), expected / 2, atol=1e-4)


def test_registered_detector_uses_the_retina_head():
  det_cfg = retinanet_r50_fpn.get_config(num_classes=C)
  det = build_detector(det_cfg)
  assert det.loss.func is retina_head.retina_loss
  assert det.predict.func is retina_head.retina_predict
  head = det.module.head
  assert (head.num_anchors, head.norm, head.use_scale, head.centerness) == (9, None, False, None)


def _head_params(det_cfg):
  feats = tuple(jnp.zeros((1, 64 // s, 64 // s, det_cfg.neck.out_channels)) for s in STRIDES)
  head = build_detector(det_cfg).module.head
  return jax.tree_util.tree_map(np.shape, head.init(jax.random.key(0), feats)['params'])


def test_gn_head_option_is_mmdetection_norm_cfg():
  """`head.norm='gn'` (RetinaHead's norm_cfg=dict(type='GN')): GroupNorm after each tower conv,
  which loses its bias (mmcv's ConvModule bias='auto'); the output convs keep theirs."""
  det_cfg = retinanet_r50_fpn.get_config(num_classes=C)
  det_cfg.neck.out_channels = 16
  det_cfg.head.update(feat_channels=16, num_convs=2, strides=STRIDES)
  plain = _head_params(det_cfg)
  det_cfg.head.update(norm='gn', gn_groups=4)
  gn = _head_params(det_cfg)
  for tower in ('cls', 'reg'):
    for i in range(2):
      assert plain[f'{tower}_convs_{i}'] == {'kernel': (3, 3, 16, 16), 'bias': (16,)}
      assert gn[f'{tower}_convs_{i}'] == {'kernel': (3, 3, 16, 16)}
      assert gn[f'{tower}_gns_{i}'] == {'scale': (16,), 'bias': (16,)}
  assert gn['conv_cls'] == plain['conv_cls'] == {'kernel': (3, 3, 16, 9 * C), 'bias': (9 * C,)}


# ----------------------------------------------------------------------------- mmdetection

@functools.lru_cache(maxsize=None)
def mmdet_retina_head():
  torch = pytest.importorskip('torch')
  pytest.importorskip('mmdet')
  mmdet_compat.stub_compiled_ops()
  from mmengine.config import ConfigDict
  from mmdet.models.dense_heads import RetinaHead
  from mmdet.utils import register_all_modules
  register_all_modules()
  train_cfg = ConfigDict(dict(
      assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0,
                    ignore_iof_thr=-1),
      sampler=dict(type='PseudoSampler'), allowed_border=-1, pos_weight=-1, debug=False))
  head = RetinaHead(num_classes=C, in_channels=8, stacked_convs=1, feat_channels=8,
                    anchor_generator=dict(type='AnchorGenerator', octave_base_scale=4,
                                          scales_per_octave=3, ratios=[0.5, 1.0, 2.0],
                                          strides=list(STRIDES)),
                    bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0.] * 4,
                                    target_stds=[1.] * 4),
                    loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25,
                                  loss_weight=1.0),
                    loss_bbox=dict(type='L1Loss', loss_weight=1.0), train_cfg=train_cfg)
  return torch, head


@pytest.mark.torch
def test_loss_equals_mmdetection_retina_head():
  """Random head outputs, 2 images with 0-4 boxes and their own padded areas: loss_cls and
  loss_bbox equal mmdetection's RetinaHead.loss_by_feat."""
  torch, head = mmdet_retina_head()
  from mmengine.structures import InstanceData
  rng = np.random.default_rng(1)
  boxes, labels, pads = [], [], [(64, 56), (48, 64)]
  for n in (4, 0):
    wh = np.exp(rng.uniform(np.log(5), np.log(50), (n, 2)))
    xy = rng.uniform(0, 1, (n, 2)) * (SIZE - wh)
    boxes.append(np.concatenate([xy, xy + wh], 1).astype(np.float32))
    labels.append(rng.integers(0, C, n))
  boxes[0][1] = np.round(boxes[0][1])
  cls_flat = rng.normal(-2, 1.5, (2, NUM_ANCHORS, C)).astype(np.float32)
  reg_flat = rng.normal(0, 0.5, (2, NUM_ANCHORS, 4)).astype(np.float32)
  cls_out, reg_out = to_levels(cls_flat, C), to_levels(reg_flat, 4)
  for mode in ('device', 'global'):  # the same on one device
    ours = retina_head.retina_loss((cls_out, reg_out, None),
                                   make_batch(boxes, labels, pads, max_gt=5),
                                   make_head_cfg(avg_factor=mode))
    nchw = lambda levels: [torch.from_numpy(np.array(x)).permute(0, 3, 1, 2) for x in levels]
    gts = []
    for b, l in zip(boxes, labels):
      inst = InstanceData()
      inst.bboxes = torch.from_numpy(b).reshape(-1, 4)
      inst.labels = torch.from_numpy(l).long()
      gts.append(inst)
    metas = [dict(img_shape=p, pad_shape=p, batch_input_shape=(SIZE, SIZE)) for p in pads]
    ref = head.loss_by_feat(nchw(cls_out), nchw(reg_out), gts, metas)
    np.testing.assert_allclose(float(ours['loss_cls']),
                               float(sum(x.item() for x in ref['loss_cls'])), rtol=1e-5)
    np.testing.assert_allclose(float(ours['loss_bbox']),
                               float(sum(x.item() for x in ref['loss_bbox'])), rtol=1e-5)


@pytest.mark.torch
def test_gn_head_parameter_count_equals_mmdetection():
  torch, _ = mmdet_retina_head()
  from mmdet.models.dense_heads import RetinaHead
  head = RetinaHead(num_classes=C, in_channels=16, stacked_convs=2, feat_channels=16,
                    norm_cfg=dict(type='GN', num_groups=4, requires_grad=True),
                    anchor_generator=dict(type='AnchorGenerator', octave_base_scale=4,
                                          scales_per_octave=3, ratios=[0.5, 1.0, 2.0],
                                          strides=list(STRIDES)))
  det_cfg = retinanet_r50_fpn.get_config(num_classes=C)
  det_cfg.neck.out_channels = 16
  det_cfg.head.update(feat_channels=16, num_convs=2, strides=STRIDES, norm='gn', gn_groups=4)
  ours = sum(math.prod(s) for s in jax.tree_util.tree_leaves(
      _head_params(det_cfg), is_leaf=lambda x: isinstance(x, tuple)))
  assert ours == sum(p.numel() for p in head.parameters())
