"""FCOS head: targets inside the loss, the loss at a perfect prediction, gradient directions,
cross-device normalisers, prediction in original pixels, the caffe backbone's frozen BN and the
optimizer's bias rules, and the multi-scale batch stream (configs/fcos.py, fcos_mstrain.py)."""
import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxdet.assigners.fcos import fcos_assign
from jaxdet.data import loader as L
from jaxdet.data import transforms as T
from jaxdet.engine import config_cli
from jaxdet.engine.optimizer import build_optimizer
from jaxdet.engine.train_state import frozen_mask
from jaxdet.models.detectors import build_backbone, build_detector
from jaxdet.models.heads import DenseHead
from jaxdet.models.heads.fcos_head import fcos_loss, fcos_predict
from jaxdet.priors import level_counts, point_grid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INF = 1e8
STRIDES = (8, 16, 32)
RANGES = ((-1, 32), (32, 64), (64, INF))
SIZE = 64                                       # input 64 x 64 -> levels 8x8, 4x4, 2x2
SIZES = tuple((SIZE // s, SIZE // s) for s in STRIDES)
NUM_CLASSES = 4
GT = np.array([[6., 10., 58., 46.]], np.float32)  # one box (52 x 36 px), class 2
LABEL = 2


def _head_cfg(**kw):
  cfg = dict(strides=STRIDES, regress_ranges=RANGES, feat_channels=16, num_convs=1, gn_groups=4,
             centerness_on_reg=False, center_sampling=False, center_sample_radius=1.5,
             norm_on_bbox=False, focal_alpha=0.25, focal_gamma=2.0, loss_cls_weight=1.0,
             loss_bbox_weight=1.0, loss_centerness_weight=1.0)
  cfg.update(kw)
  return ml_collections.ConfigDict(cfg)


@functools.lru_cache(maxsize=None)
def _loss_fn(norm_on_bbox=False):
  """`fcos_loss` with `_head_cfg(norm_on_bbox=...)`, jitted (one compilation per shape)."""
  cfg = _head_cfg(norm_on_bbox=norm_on_bbox)
  return jax.jit(lambda outputs, batch: fcos_loss(outputs, batch, cfg))


def _batch(boxes=GT, labels=(LABEL,), num_images=1, max_gt=3):
  """One image's gts repeated `num_images` times, padded to `max_gt` rows."""
  b = np.zeros((num_images, max_gt, 4), np.float32)
  lab = np.zeros((num_images, max_gt), np.int32)
  mask = np.zeros((num_images, max_gt), bool)
  n = len(boxes)
  b[:, :n], lab[:, :n], mask[:, :n] = boxes, labels, True
  return dict(gt_boxes=jnp.asarray(b), gt_labels=jnp.asarray(lab), gt_mask=jnp.asarray(mask))


def _reference_targets(box, strides=STRIDES, ranges=RANGES, sizes=SIZES):
  """Slow numpy FCOS targets for ONE box: (positive (P,), ltrb (P, 4), stride (P,)) with the
  points in (level, y, x) order. Positive = strictly inside the box and max distance in the
  level's closed regress range."""
  pos, ltrb, stride_of = [], [], []
  for (h, w), s, (lo, hi) in zip(sizes, strides, ranges):
    for i in range(h):
      for j in range(w):
        x, y = (j + 0.5) * s, (i + 0.5) * s
        d = [x - box[0], y - box[1], box[2] - x, box[3] - y]
        pos.append(min(d) > 0 and lo <= max(d) <= hi)
        ltrb.append(d)
        stride_of.append(s)
  return np.array(pos), np.array(ltrb, np.float64), np.array(stride_of, np.float64)


def _to_levels(flat, sizes=SIZES):
  """(B, P, C) in (level, y, x) order -> tuple over levels of (B, H_l, W_l, C)."""
  out, start = [], 0
  for h, w in sizes:
    out.append(flat[:, start:start + h * w].reshape(flat.shape[0], h, w, flat.shape[-1]))
    start += h * w
  return tuple(out)


def _outputs(cls, reg, ctr):
  return _to_levels(cls), _to_levels(reg), _to_levels(ctr[..., None])


def _random_init(module, *args):
  """Variables of `module` from a shape-only init (no compilation): parameters N(0, 0.1), BN
  statistics mean 0 / var 1."""
  shapes = jax.eval_shape(module.init, jax.random.key(0), *args)
  rng = np.random.default_rng(1)

  def fill(path, x):
    if path[0].key == 'batch_stats':
      return np.full(x.shape, 1.0 if path[-1].key == 'var' else 0.0, np.float32)
    return rng.normal(0, 0.1, x.shape).astype(np.float32)
  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope='module')
def reference():
  pos, ltrb, strides = _reference_targets(GT[0])
  assert 0 < pos.sum() < len(pos)  # the case is not trivial: positives on two levels, and
  assert len(set(strides[pos])) == 2  # points inside the box but out of their level's range
  inside = ltrb.min(axis=1) > 0
  assert (inside & ~pos).any()
  return pos, ltrb, strides


def _perfect_outputs(pos, ltrb, num_images=1):
  """Confident classes, log of the true distances, centerness logits = logit(target)."""
  num_points = len(pos)
  cls = np.full((num_images, num_points, NUM_CLASSES), -30.0)
  cls[:, pos, LABEL] = 30.0
  reg = np.zeros((num_images, num_points, 4))
  reg[:, pos] = np.log(ltrb[pos])
  l, t, r, b = ltrb[pos].T
  ctr_t = np.sqrt(np.minimum(l, r) / np.maximum(l, r) * np.minimum(t, b) / np.maximum(t, b))
  ctr = np.zeros((num_images, num_points))
  ctr[:, pos] = np.log(ctr_t / (1 - ctr_t))
  return (jnp.asarray(cls, jnp.float32), jnp.asarray(reg, jnp.float32),
          jnp.asarray(ctr, jnp.float32)), ctr_t


def test_loss_positives_are_the_assigned_points_and_the_reference(reference):
  pos_ref, _, _ = reference
  cfg = _head_cfg()
  batch = _batch()
  points = point_grid(SIZES, strides=STRIDES)
  assigned = fcos_assign(points, batch['gt_boxes'][0], batch['gt_labels'][0],
                         batch['gt_mask'][0], num_level_points=level_counts(SIZES, 1),
                         strides=STRIDES, regress_ranges=RANGES)
  np.testing.assert_array_equal(np.asarray(assigned.gt_index) >= 0, pos_ref)

  # Which points does the loss treat as positives? Those whose centerness and box outputs get
  # a gradient (both terms only see positives; with all-zero outputs every positive has a
  # non-zero gradient there).
  num_points = len(pos_ref)
  zeros = lambda c: jnp.zeros((1, num_points, c), jnp.float32)

  def parts(reg, ctr):
    out = fcos_loss(_outputs(zeros(NUM_CLASSES), reg, ctr[..., 0]), batch, cfg)
    return out['loss_bbox'] + out['loss_centerness'], out

  (_, out), (g_reg, g_ctr) = jax.jit(jax.value_and_grad(parts, argnums=(0, 1), has_aux=True))(
      zeros(4), zeros(1))
  from_reg = np.abs(np.asarray(g_reg[0])).sum(-1) > 0
  from_ctr = np.asarray(g_ctr[0, :, 0]) != 0
  np.testing.assert_array_equal(from_reg, pos_ref)
  np.testing.assert_array_equal(from_ctr, pos_ref)
  assert float(out['num_pos']) == pos_ref.sum()


def test_loss_at_a_perfect_prediction(reference):
  pos, ltrb, _ = reference
  (cls, reg, ctr), ctr_t = _perfect_outputs(pos, ltrb)
  out = _loss_fn()(_outputs(cls, reg, ctr), _batch())
  assert float(out['loss_cls']) < 1e-9
  assert abs(float(out['loss_bbox'])) < 1e-5
  # The BCE minimum over the logits is the entropy of the (soft) targets, not 0.
  entropy = -(ctr_t * np.log(ctr_t) + (1 - ctr_t) * np.log(1 - ctr_t))
  np.testing.assert_allclose(float(out['loss_centerness']), entropy.mean(), rtol=1e-5)

  # ... and it is the minimum: nudging any positive's centerness logit raises the loss.
  for k in np.flatnonzero(pos)[:3]:
    for delta in (-0.3, 0.3):
      out2 = _loss_fn()(_outputs(cls, reg, ctr.at[0, k].add(delta)), _batch())
      assert float(out2['loss_centerness']) > float(out['loss_centerness'])


def test_no_positives_gives_zero_box_and_centerness_losses():
  num_points = sum(h * w for h, w in SIZES)
  rng = np.random.default_rng(0)
  outputs = _outputs(*(jnp.asarray(rng.normal(size=(1, num_points) + c), jnp.float32)
                       for c in ((NUM_CLASSES,), (4,), ())))
  batch = _batch()
  batch['gt_mask'] = jnp.zeros_like(batch['gt_mask'])
  out = _loss_fn()(outputs, batch)
  assert float(out['loss_bbox']) == 0.0 and float(out['loss_centerness']) == 0.0
  assert float(out['num_pos']) == 0.0
  # focal over every point, all negatives, normalised by max(num_pos, 1) = 1
  x = np.concatenate([np.asarray(o).reshape(-1, NUM_CLASSES) for o in outputs[0]]).astype(
      np.float64)
  p = 1 / (1 + np.exp(-x))
  expected = (0.75 * p ** 2 * -np.log(1 - p)).sum()
  np.testing.assert_allclose(float(out['loss_cls']), expected, rtol=1e-4)


def _iou(a, b):
  lt, rb = np.maximum(a[:, :2], b[:, :2]), np.minimum(a[:, 2:], b[:, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
  area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=1)
  return inter / (area(a) + area(b) - inter)


@pytest.mark.parametrize('norm_on_bbox', [False, True])
def test_a_gradient_step_moves_the_boxes_toward_the_gt(reference, norm_on_bbox):
  pos, ltrb, strides = reference
  (cls, _, ctr), ctr_t = _perfect_outputs(pos, ltrb)
  rng = np.random.default_rng(1)
  true = np.zeros_like(ltrb)   # the ideal raw outputs at positives (0 elsewhere)
  true[pos] = ltrb[pos] / strides[pos, None] if norm_on_bbox else np.log(ltrb[pos])
  scale = np.abs(true) if norm_on_bbox else np.ones_like(true)  # of the noise and of the step
  reg = jnp.asarray((true + rng.uniform(-0.4, 0.4, true.shape) * scale)[None], jnp.float32)
  ctr = jnp.zeros_like(ctr)
  cls = jnp.zeros_like(cls)
  def total(cls, reg, ctr):
    out = _loss_fn(norm_on_bbox)(_outputs(cls, reg, ctr), _batch())
    return out['loss_cls'] + out['loss_bbox'] + out['loss_centerness']

  g_cls, g_reg, g_ctr = jax.jit(jax.grad(total, argnums=(0, 1, 2)))(cls, reg, ctr)
  points = point_grid(SIZES, strides=STRIDES)[pos]

  def decode(r):
    d = np.asarray(r[0])[pos]
    d = d * strides[pos, None] if norm_on_bbox else np.exp(d)
    return np.concatenate([points - d[:, :2], points + d[:, 2:]], axis=1)

  # Each positive's box term depends on its own output only: step each point's four outputs
  # along its own (normalised) negative gradient.
  g = np.asarray(g_reg)
  step = g / np.maximum(np.linalg.norm(g, axis=-1, keepdims=True), 1e-30)
  before = _iou(decode(reg), np.repeat(GT, pos.sum(), 0))
  after = _iou(decode(reg - 0.02 * step * scale[None]),
               np.repeat(GT, pos.sum(), 0))
  assert np.all(after > before), (before, after)
  # the gt class rises at positives, every logit falls elsewhere; centerness moves to target
  assert np.all(np.asarray(g_cls[0, pos, LABEL]) < 0)
  assert np.all(np.asarray(g_cls[0, ~pos]) > 0)
  sig = 0.5
  np.testing.assert_array_equal(np.sign(-np.asarray(g_ctr[0, pos])), np.sign(ctr_t - sig))


def test_normalisers_are_means_over_devices(reference):
  """4 images as 1 device or as 2 devices x 2 images (vmap with an axis name stands in for
  pmap): the mean of the per-device losses equals the one-device loss (mmdetection's
  reduce_mean of num_pos and of the centerness sum)."""
  pos, ltrb, _ = reference
  (cls, reg, ctr), _ = _perfect_outputs(pos, ltrb, num_images=4)
  rng = np.random.default_rng(2)
  cls, reg, ctr = (x + jnp.asarray(rng.normal(0, 0.5, x.shape), jnp.float32)
                   for x in (cls, reg, ctr))
  boxes = np.array([[GT[0]], [[4., 4., 60., 60.]], [[30., 2., 38., 12.]], [[0., 0., 1., 1.]]],
                   np.float32)
  batch = dict(gt_boxes=jnp.asarray(boxes), gt_labels=jnp.array([[2], [0], [3], [1]]),
               gt_mask=jnp.array([[True], [True], [True], [False]]))
  cfg = _head_cfg()
  one = jax.jit(lambda c, r, z: fcos_loss(_outputs(c, r, z), batch, cfg))(cls, reg, ctr)

  split = lambda x: x.reshape((2, 2) + x.shape[1:])
  per_device = jax.jit(jax.vmap(lambda c, r, z, b: fcos_loss(_outputs(c, r, z), b, cfg,
                                                     axis_name='devices'),
                        axis_name='devices'))(split(cls), split(reg), split(ctr),
                                             jax.tree_util.tree_map(split, batch))
  # the last device holds an image without gts: its own positives differ from the mean
  assert float(per_device['num_pos'][0]) != float(per_device['num_pos'][1])
  for k in ('loss_cls', 'loss_bbox', 'loss_centerness'):
    np.testing.assert_allclose(float(per_device[k].mean()), float(one[k]), rtol=1e-5)


@pytest.mark.parametrize('norm_on_bbox', [False, True])
def test_predict_one_confident_point_in_original_pixels(norm_on_bbox):
  num_points = sum(h * w for h, w in SIZES)
  level, (i, j), dist = 1, (1, 2), np.array([5., 6., 7., 8.])
  index = SIZES[0][0] * SIZES[0][1] + i * SIZES[1][1] + j
  cls = np.full((1, num_points, NUM_CLASSES), -20.0)
  cls[0, index, 3] = 10.0
  reg = np.zeros((1, num_points, 4))
  reg[0, index] = dist / STRIDES[level] if norm_on_bbox else np.log(dist)
  ctr = np.zeros((1, num_points))  # sigmoid 0.5
  batch = dict(img_shape=jnp.array([[64, 60]]), scale_factor=jnp.array([[2.0, 4.0]]),
               offset=jnp.zeros((1, 2)), flip=jnp.array([False]))
  test_cfg = ml_collections.ConfigDict(dict(nms_pre=1000, score_thr=0.05, iou_threshold=0.5,
                                            max_per_img=10, min_bbox_size=0.0))
  cfg = _head_cfg(norm_on_bbox=norm_on_bbox)
  pred = jax.jit(lambda o, b: fcos_predict(o, b, cfg, test_cfg))(
      _outputs(*(jnp.asarray(x, jnp.float32) for x in (cls, reg, ctr))), batch)
  assert int(pred.valid.sum()) == 1
  x, y = (j + 0.5) * STRIDES[level], (i + 0.5) * STRIDES[level]   # (40, 24) input pixels
  box = np.array([x - dist[0], y - dist[1], x + dist[2], y + dist[3]]) / [2., 4., 2., 4.]
  np.testing.assert_allclose(np.asarray(pred.boxes[0, 0]), box, rtol=1e-5)
  assert int(pred.labels[0, 0]) == 3
  np.testing.assert_allclose(float(pred.scores[0, 0]), 0.5 / (1 + np.exp(-10.0)), rtol=1e-5)


def test_predict_clips_to_the_image():
  num_points = sum(h * w for h, w in SIZES)
  cls = np.full((1, num_points, NUM_CLASSES), -20.0)
  cls[0, 0, 0] = 10.0                                  # the point (4, 4) of level 0
  reg = np.zeros((1, num_points, 4))
  reg[0, 0] = np.log([100., 2., 100., 200.])
  batch = dict(img_shape=jnp.array([[50, 60]]), scale_factor=jnp.ones((1, 2)),
               offset=jnp.zeros((1, 2)), flip=jnp.array([False]))
  test_cfg = ml_collections.ConfigDict(dict(nms_pre=1000, score_thr=0.05, iou_threshold=0.5,
                                            max_per_img=10))
  cfg = _head_cfg()
  pred = jax.jit(lambda o, b: fcos_predict(o, b, cfg, test_cfg))(
      _outputs(*(jnp.asarray(x, jnp.float32) for x in (cls, reg, np.zeros((1, num_points))))),
      batch)
  np.testing.assert_allclose(np.asarray(pred.boxes[0, 0]), [0., 2., 60., 50.])


@pytest.mark.parametrize('on_reg', [False, True])
def test_centerness_branch_follows_its_tower(on_reg):
  """Centerness off the classification tower (mmdetection's default) or the box tower."""
  cfg = _head_cfg(centerness_on_reg=on_reg)
  from jaxdet.models.heads.fcos_head import fcos_head_module
  head = fcos_head_module(cfg, NUM_CLASSES)
  assert isinstance(head, DenseHead) and head.norm == 'gn' and head.use_scale
  rng = np.random.default_rng(0)
  feats = tuple(jnp.asarray(rng.normal(size=(1, h, w, 16)), jnp.float32) for h, w in SIZES)
  params = _random_init(head, feats)['params']
  grads = jax.jit(jax.grad(lambda p: sum(x.sum() for x in head.apply({'params': p}, feats)[2])))(
      params)
  cls_tower = np.abs(np.asarray(grads['cls_convs_0']['kernel'])).sum()
  reg_tower = np.abs(np.asarray(grads['reg_convs_0']['kernel'])).sum()
  assert (reg_tower > 0, cls_tower > 0) == (on_reg, not on_reg)


# ----------------------------------------------------------------- caffe backbone, optimizer

@pytest.fixture(scope='module')
def tiny_caffe_fcos():
  """configs/fcos.py:smoke's detector with the full model's backbone rules (caffe style, frozen
  stage 1, BN frozen and in eval mode): the backbone's gradients on one image (of the backbone
  built from that config), and the whole detector's parameter tree (shape-only init, random
  values)."""
  config = config_cli.load_config(os.path.join(ROOT, 'configs', 'fcos.py') + ':smoke')
  config.model.backbone.update(frozen_stages=1, norm_eval=True, norm_trainable=False)
  config.model.head.num_convs = 1
  backbone = build_backbone(config.model.backbone)
  image = jnp.asarray(np.random.default_rng(0).normal(size=(1, 32, 32, 3)), jnp.float32)
  variables = _random_init(backbone, image)

  @jax.jit
  def grads(params):
    def loss(p):
      feats = backbone.apply({'params': p, 'batch_stats': variables['batch_stats']}, image,
                             train=True)
      return sum((f ** 2).mean() for f in feats)
    return jax.grad(loss)(params)

  params = _random_init(build_detector(config.model).module,
                        jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32))['params']
  return config, params, variables['params'], grads(variables['params'])


def _flat(tree):
  return {'/'.join(str(k.key) for k in path): np.asarray(x)
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _is_backbone_norm(key):
  return key.startswith('backbone/') and key.rsplit('/', 1)[1] in ('scale', 'bias')


def test_caffe_backbone_bn_gets_no_gradient(tiny_caffe_fcos):
  config, params, backbone_params, backbone_grads = tiny_caffe_fcos
  g = {f'backbone/{k}': v for k, v in _flat(backbone_grads).items()}
  norms = [k for k in g if _is_backbone_norm(k)]
  assert len(norms) == 2 * 20   # R18: stem BN + 4 stages x 2 blocks x 2 BN + 3 downsample BN
  for k in norms:
    assert not g[k].any(), k
  assert not g['backbone/conv1/kernel'].any()           # frozen stem
  assert not g['backbone/layer1_0/conv1/kernel'].any()  # frozen stage 1
  assert g['backbone/layer2_0/conv1/kernel'].any()      # stage 2 trains
  assert g['backbone/layer4_1/conv2/kernel'].any()
  assert all(np.isfinite(v).all() for v in g.values())
  # ... and they are still parameters (counted, saved), the detector's too
  assert set(g) == {f'backbone/{k}' for k in _flat(backbone_params)}
  assert all(k in _flat(params) for k in norms)


def test_optimizer_frozen_bn_and_bias_rules(tiny_caffe_fcos):
  """configs/fcos.py's optimizer, first step (momentum buffer empty): BN of the caffe backbone
  and frozen stage 1 get a zero update even from a non-zero gradient; conv biases 2x lr and no
  decay; GroupNorm biases lr x1 and no decay (mmengine: no norm_decay_mult, so a norm bias takes
  bias_decay_mult but not bias_lr_mult); kernels and GroupNorm scales lr x1 and decay."""
  config, params, _, _ = tiny_caffe_fcos
  opt = config.optimizer
  assert (opt.paramwise.bias_lr_mult, opt.paramwise.bias_decay_mult, opt.grad_clip) == (2.0, 0.0,
                                                                                        35.0)
  lr, wd = 0.01, opt.weight_decay
  tx = build_optimizer(opt, lambda step: lr, params, frozen_mask(params, config.model))
  rng = np.random.default_rng(0)
  grads = jax.tree_util.tree_map(
      lambda p: jnp.asarray(rng.uniform(-1e-3, 1e-3, np.shape(p)), jnp.float32), params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  u, g, p = _flat(updates), _flat(grads), _flat(params)
  assert sum(np.sum(v.astype(np.float64) ** 2) for v in g.values()) ** 0.5 < 35  # no clipping
  for k in u:
    if _is_backbone_norm(k) or k.startswith(('backbone/conv1', 'backbone/layer1_')):
      expected = np.zeros_like(p[k])
    elif k.endswith('/bias') and '_gns_' not in k:         # conv biases (FPN, head)
      expected = -2 * lr * g[k]
    elif k.endswith('/bias'):                              # GroupNorm biases
      expected = -lr * g[k]
    else:                                                  # kernels, GroupNorm, Scale
      expected = -lr * (g[k] + wd * p[k])
    np.testing.assert_allclose(u[k], expected, rtol=1e-5, atol=1e-12, err_msg=k)
  assert any(k.startswith('neck/') and k.endswith('/bias') for k in u)
  assert any('_gns_' in k for k in u)


def test_default_backbone_bn_still_trains():
  """Without norm_trainable (ATSS, the smoke runs) BN outside the frozen stages trains."""
  config = config_cli.load_config(os.path.join(ROOT, 'configs', 'atss.py'))
  backbone = {'conv1': {'kernel': np.zeros(1)}, 'bn1': {'scale': np.zeros(1), 'bias': np.zeros(1)},
              'layer2_0': {'bn1': {'scale': np.zeros(1), 'bias': np.zeros(1)}}}
  mask = frozen_mask({'backbone': backbone, 'head': {'x': np.zeros(1)}}, config.model)
  assert mask['backbone'] == {'conv1': {'kernel': True}, 'bn1': {'scale': True, 'bias': True},
                              'layer2_0': {'bn1': {'scale': False, 'bias': False}}}
  config.model.backbone.norm_trainable = False
  mask = frozen_mask({'backbone': backbone, 'head': {'x': np.zeros(1)}}, config.model)
  assert mask['backbone']['layer2_0']['bn1'] == {'scale': True, 'bias': True}
  assert mask['head'] == {'x': False}


# ----------------------------------------------------------------- configs and data

def test_fcos_configs_follow_mmdetection():
  c = config_cli.load_config(os.path.join(ROOT, 'configs', 'fcos.py'))
  assert c.model.type == 'fcos'
  assert (c.model.backbone.style, c.model.backbone.frozen_stages, c.model.backbone.norm_eval,
          c.model.backbone.norm_trainable) == ('caffe', 1, True, False)
  assert (c.model.neck.start_level, c.model.neck.add_extra_convs,
          c.model.neck.relu_before_extra_convs, c.model.neck.num_outs) == (1, 'on_output', True, 5)
  assert tuple(c.data.pipeline.mean) == (102.9801, 115.9465, 122.7717)
  assert tuple(c.data.pipeline.std) == (1.0, 1.0, 1.0) and c.data.pipeline.to_bgr
  assert (c.schedule.warmup, c.schedule.warmup_iters, c.schedule.epochs,
          tuple(c.schedule.milestones)) == ('constant', 500, 12, (8, 11))
  assert c.schedule.warmup_ratio == pytest.approx(1 / 3)
  assert (c.optimizer.base_lr, c.optimizer.momentum, c.optimizer.weight_decay) == (0.01, 0.9, 1e-4)
  assert c.model.test_cfg.iou_threshold == 0.5
  ms = config_cli.load_config(os.path.join(ROOT, 'configs', 'fcos_mstrain.py'))
  assert tuple(map(tuple, ms.data.pipeline.multiscale)) == ((1333, 640), (1333, 800))
  assert (ms.schedule.epochs, tuple(ms.schedule.milestones)) == (24, (16, 22))
  assert ms.model.to_dict() == c.model.to_dict()


class _Images:
  """In-memory source: `n` images of (h, w) with one box each."""

  def __init__(self, n, shape):
    rng = np.random.default_rng(0)
    h, w = shape
    self.records = [dict(image=rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
                         boxes=np.array([[w * 0.2, h * 0.2, w * 0.7, h * 0.6]], np.float32),
                         labels=np.array([0], np.int32), image_id=i + 1, orig_size=(h, w))
                    for i in range(n)]

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    return self.records[i]


@pytest.mark.parametrize('arg,image,shorts', [
    ('', (48, 64), {640, 800}),         # COCO-like 4:3 -> 640 x 853 or 800 x 1067
    ('', (64, 48), {640, 800}),         # portrait
    ('smoke', (160, 160), {128, 160}),  # the smoke's two scales
])
def test_mstrain_stream_has_both_scales_and_fits_the_buckets(arg, image, shorts):
  config = config_cli.load_config(os.path.join(ROOT, 'configs', 'fcos_mstrain.py')
                                  + (f':{arg}' if arg else ''))
  d = config.data
  d.samples_per_gpu, d.workers_per_gpu = 2, 0
  buckets = T.bucket_shapes(d.pipeline, tuple(d.img_scale), train=True)
  if not arg:   # the larger scale's buckets hold both scales
    assert buckets == [(800, 1344), (1344, 800)]
  loader = L.build_train_loader(d, _Images(8, image), seed=0, num_devices=1, process_index=0,
                                process_count=1)
  seen = set()
  for j in range(8):
    b = loader.batch(j)
    hb, wb = b['image'].shape[2:4]
    assert (hb, wb) in buckets
    for (h, w), pad in zip(b['img_shape'][0], b['pad_shape'][0]):
      assert h <= hb and w <= wb and pad[0] <= hb and pad[1] <= wb
      seen.add(int(min(h, w)))
      # the long side follows the ratio of the short one (keep ratio)
      long_expected = round(min(h, w) * max(image) / min(image))
      assert abs(max(h, w) - long_expected) <= 1
  assert seen == shorts
