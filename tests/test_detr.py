"""DETR without PyTorch: parameter counts, initialisation, positional encoding and padding mask by
hand, dropout, and the loss / prediction behaviours mmdetection's tests cannot show (padded and
invalid images, images without boxes, more gts than queries, gradients)."""
import logging
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxdet.models.backbones import ResNet
from jaxdet.models.backbones.resnet import frozen_param_mask
from jaxdet.models.heads.detr_head import DETRHead, detr_predict, nearest_indices, padding_mask
from jaxdet.models.heads.detr_loss import detr_loss
from jaxdet.models.layers.positional_encoding import sine_positional_encoding
from jaxdet.models.necks.channel_mapper import ChannelMapper

CFG = ml_collections.ConfigDict(dict(bg_cls_weight=0.1))


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


# ------------------------------------------------------------------------ parameter counts

@pytest.fixture(scope='module')
def full_size_params():
  """Shapes of mmdetection's DETR R50 parts (backbone C5 only, 1x1 projection, 80 classes)."""
  image = jax.ShapeDtypeStruct((1, 64, 96, 3), jnp.float32)
  backbone = ResNet(depth=50, out_indices=(3,), frozen_stages=1, norm_trainable=False)
  b = jax.eval_shape(backbone.init, jax.random.key(0), image)['params']
  c5 = (jax.ShapeDtypeStruct((1, 2, 3, 2048), jnp.float32),)
  n = jax.eval_shape(ChannelMapper(256).init, jax.random.key(0), c5)['params']
  p5 = (jax.ShapeDtypeStruct((1, 2, 3, 256), jnp.float32),)
  h = jax.eval_shape(DETRHead(num_classes=80).init, jax.random.key(0), p5)['params']
  return dict(backbone=b, neck=n, head=h)


def test_param_count_equals_mmdetection(full_size_params):
  p = full_size_params
  head = p['head']
  assert _count(p['backbone']) == 23_508_032
  assert _count(p['neck']) == 524_544
  assert _count(head['encoder']) == 7_890_432
  assert _count(head['decoder']) == 9_473_024
  assert _count(head['query_embedding']) == 25_600
  assert _count({k: v for k, v in head.items()
                 if k in ('fc_cls', 'reg_ffn', 'fc_reg')}) == 153_429
  assert _count(p) == 41_575_061


def test_trainable_count_equals_mmdetection(full_size_params):
  """Frozen: stem + stage 1 and every BN scale / bias (norm_cfg requires_grad=False)."""
  p = full_size_params
  frozen = frozen_param_mask(p['backbone'], 1, norm_trainable=False)
  frozen_count = sum(int(np.prod(x.shape)) for x, f in zip(
      jax.tree_util.tree_leaves(p['backbone']), jax.tree_util.tree_leaves(frozen)) if f)
  assert _count(p) - frozen_count == 41_299_541


def test_init_as_mmdetection():
  """xavier-uniform with the fused in-projection's bound, N(0, 1) queries, zero attention
  biases, LayerNorm 1 / 0."""
  head = DETRHead(num_classes=80, num_encoder_layers=1, num_decoder_layers=1)  # the same layers
  v = jax.jit(head.init)(jax.random.key(0), (jnp.zeros((1, 2, 3, 256)),))['params']
  attn = v['encoder']['layers_0']['self_attn']
  in_proj = np.asarray(attn['in_proj']['kernel'])
  assert in_proj.shape == (256, 768)
  bound = math.sqrt(6 / 1024)
  assert np.abs(in_proj).max() <= bound and np.abs(in_proj).max() > 0.99 * bound
  np.testing.assert_allclose(in_proj.std(), bound / math.sqrt(3), rtol=0.02)
  out_bound = math.sqrt(6 / 512)
  assert 0.99 * out_bound < np.abs(attn['out_proj']['kernel']).max() <= out_bound
  assert not np.any(attn['in_proj']['bias']) and not np.any(attn['out_proj']['bias'])
  ffn = v['decoder']['layers_0']['ffn']['layers_0_0']['kernel']
  assert 0.99 * math.sqrt(6 / 2304) < np.abs(ffn).max() <= math.sqrt(6 / 2304)
  np.testing.assert_allclose(np.asarray(v['query_embedding']['embedding']).std(), 1., rtol=0.02)
  norm = v['decoder']['post_norm']
  assert np.all(norm['scale'] == 1) and not np.any(norm['bias'])


# -------------------------------------------------------------- positional encoding, mask

def reference_sine(mask, num_feats, temperature=10000., eps=1e-6, scale=2 * math.pi):
  """DETR's formula written out with loops (float64)."""
  b, h, w = mask.shape
  out = np.zeros((b, h, w, 2 * num_feats))
  for n in range(b):
    for y in range(h):
      for x in range(w):
        ye = (~mask[n, :y + 1, x]).sum() / ((~mask[n, :, x]).sum() + eps) * scale
        xe = (~mask[n, y, :x + 1]).sum() / ((~mask[n, y, :]).sum() + eps) * scale
        for i in range(num_feats):
          t = temperature ** (2 * (i // 2) / num_feats)
          f = math.sin if i % 2 == 0 else math.cos
          out[n, y, x, i] = f(ye / t)
          out[n, y, x, num_feats + i] = f(xe / t)
  return out


def test_positional_encoding_by_hand():
  mask = np.zeros((2, 3, 4), bool)
  mask[1, 2:, :] = True
  mask[1, :, 3:] = True
  np.testing.assert_allclose(sine_positional_encoding(jnp.asarray(mask), num_feats=8),
                             reference_sine(mask, 8), atol=2e-6)


def test_padding_mask_by_hand():
  # input 64 x 96 -> feature 2 x 3: feature cells look at input rows (0, 32), columns (0, 32, 64)
  mask = padding_mask(np.array([[64, 96], [40, 96], [30, 50]]), (64, 96), (2, 3))
  expected = np.zeros((3, 2, 3), bool)
  expected[2, 1, :] = True       # row 32 >= 30
  expected[2, :, 2] = True       # column 64 >= 50
  np.testing.assert_array_equal(mask, expected)
  np.testing.assert_array_equal(nearest_indices(1199, 38)[-3:], [1104, 1135, 1167])


# ------------------------------------------------------------------------------- network

def small_head(**kw):
  return DETRHead(num_classes=5, embed_dims=32, num_heads=4, num_encoder_layers=1,
                  num_decoder_layers=2, feedforward_channels=64, num_queries=7, **kw)


def test_dropout_only_in_training_and_deterministic_per_key():
  head = small_head()
  feats = (jax.random.normal(jax.random.key(0), (2, 3, 4, 32)),)
  img_shape = jnp.array([[96, 128], [64, 100]])
  v = jax.jit(lambda k: head.init(k, feats, img_shape, (96, 128)))(jax.random.key(1))
  apply = jax.jit(lambda key, train: head.apply(v, feats, img_shape, (96, 128), train=train,
                                                rngs={'dropout': key})[0], static_argnums=1)
  a, b = apply(jax.random.key(2), True), apply(jax.random.key(2), True)
  c = apply(jax.random.key(3), True)
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).max() > 1e-3
  e1 = jax.jit(lambda: head.apply(v, feats, img_shape, (96, 128), train=False)[0])()
  np.testing.assert_array_equal(e1, apply(jax.random.key(4), False))
  assert np.abs(e1 - a).max() > 1e-3


# ---------------------------------------------------------------------------------- loss

def random_case(seed, b=3, q=7, g=5, layers=2, classes=5, size=(96, 128)):
  rng = np.random.default_rng(seed)
  cls = rng.standard_normal((layers, b, q, classes + 1)).astype(np.float32)
  box = (1 / (1 + np.exp(-rng.standard_normal((layers, b, q, 4))))).astype(np.float32)
  xy = rng.uniform(0, 60, (b, g, 2))
  gt = np.concatenate([xy, xy + rng.uniform(4, 40, (b, g, 2))], -1).astype(np.float32)
  batch = dict(gt_boxes=gt, gt_labels=rng.integers(0, classes, (b, g)).astype(np.int32),
               gt_mask=rng.random((b, g)) < 0.6, img_shape=np.array([size] * b, np.int32),
               image_valid=np.ones(b, bool))
  return (jnp.asarray(cls), jnp.asarray(box)), batch


def loss_of(outputs, batch, cfg=CFG):
  return jax.device_get(jax.jit(lambda o, b: detr_loss(o, b, cfg))(outputs, batch))


def test_invalid_images_change_nothing():
  outputs, batch = random_case(0)
  ref = loss_of((outputs[0][:, :2], outputs[1][:, :2]),
                {k: v[:2] for k, v in batch.items()})
  batch['image_valid'] = np.array([True, True, False])
  batch['gt_mask'][2] = True
  batch['gt_boxes'][2] = np.nan       # whatever an evaluation pad holds
  got = loss_of(outputs, batch)
  for k in ref:
    np.testing.assert_allclose(got[k], ref[k], rtol=1e-6, err_msg=k)


def test_padded_gt_rows_and_their_order_do_not_matter():
  outputs, batch = random_case(1)
  ref = loss_of(outputs, batch)
  perm = np.random.default_rng(0).permutation(batch['gt_mask'].shape[1])
  shuffled = dict(batch, gt_boxes=batch['gt_boxes'][:, perm], gt_labels=batch['gt_labels'][:, perm],
                  gt_mask=batch['gt_mask'][:, perm])
  shuffled['gt_boxes'] = np.where(shuffled['gt_mask'][..., None], shuffled['gt_boxes'], np.nan)
  got = loss_of(outputs, shuffled)
  for k in ref:
    np.testing.assert_allclose(got[k], ref[k], rtol=1e-6, err_msg=k)


def test_images_without_boxes_give_background_ce_only():
  outputs, batch = random_case(2)
  batch['gt_mask'][:] = False
  got = loss_of(outputs, batch)
  cls = np.asarray(outputs[0][-1], np.float64)
  logp = cls - np.log(np.exp(cls).sum(-1, keepdims=True))
  expected = -(0.1 * logp[..., -1]).sum() / (0.1 * logp[..., -1].size)   # avg = 0.1 num_neg
  np.testing.assert_allclose(got['loss_cls'], expected, rtol=1e-5)
  for k in ('loss_bbox', 'loss_iou', 'loss_bbox_d0', 'loss_iou_d0', 'num_pos'):
    assert got[k] == 0, k


def test_more_gts_than_queries_warns_once_and_counts(caplog):
  outputs, batch = random_case(3, q=3, g=6)
  batch['gt_mask'][:] = True
  cfg = ml_collections.ConfigDict(dict(bg_cls_weight=0.1, match_method='device'))
  with caplog.at_level(logging.WARNING, logger='jaxdet'):
    got = loss_of(outputs, batch, cfg)
    assert any('stay unmatched' in r.message for r in caplog.records)
    caplog.clear()
    loss_of(outputs, batch, cfg)      # traced again: no second warning
    assert not any('stay unmatched' in r.message for r in caplog.records)
  assert got['num_pos'] == 3 * 3 and got['num_unmatched_gts'] == 3 * 3


def test_gradients_are_finite_and_reach_every_output():
  outputs, batch = random_case(4)
  batch['gt_boxes'] = np.where(batch['gt_mask'][..., None], batch['gt_boxes'], np.nan)
  total = lambda o: sum(v for k, v in detr_loss(o, batch, CFG).items() if k.startswith('loss_'))
  g_cls, g_box = jax.jit(jax.grad(total))(outputs)
  assert np.all(np.isfinite(g_cls)) and np.all(np.isfinite(g_box))
  assert np.all(np.abs(g_cls).sum(-1) > 0)                       # every query's logits
  matched = np.abs(g_box).sum(-1) > 0
  assert matched.sum() == 2 * batch['gt_mask'].sum()             # only matched boxes, per layer


# ------------------------------------------------------------------------------ predict

def test_predict_by_hand():
  """Best non-background class per query, top-k by its probability, boxes to pixels, clipped,
  then back to the original image (scale 0.5, horizontally flipped)."""
  logits = np.full((1, 1, 3, 3), -10., np.float32)       # 2 classes + background
  logits[0, 0, 0] = [2., 0., 3.]       # background wins, class 0 still 0.25 ..
  logits[0, 0, 1] = [0., 4., 0.]
  logits[0, 0, 2] = [1., 1., -5.]
  boxes = np.array([[[[0.5, 0.5, 0.2, 0.2], [0.25, 0.5, 0.5, 1.], [0.9, 0.9, 0.4, 0.4]]]],
                   np.float32)
  batch = dict(img_shape=np.array([[100, 200]], np.int32),
               scale_factor=np.array([[0.5, 0.5]], np.float32), flip=np.array([True]))
  pred = detr_predict((jnp.asarray(logits), jnp.asarray(boxes)), batch, None,
                      ml_collections.ConfigDict(dict(max_per_img=2)))
  p = jax.nn.softmax(jnp.asarray(logits[0, 0]), -1)
  np.testing.assert_allclose(pred.scores[0], [p[1, 1], p[2, 0]], rtol=1e-6)
  np.testing.assert_array_equal(pred.labels[0], [1, 0])
  np.testing.assert_array_equal(pred.index[0], [1, 2])
  # query 1: xyxy px (0, 0, 100, 100); query 2: (140, 70, 220, 110) clipped to (140, 70, 200, 100)
  # flip in the 200 px input: x -> 200 - x; then / 0.5
  np.testing.assert_allclose(pred.boxes[0], [[200, 0, 400, 200], [0, 140, 120, 200]], atol=1e-4)
  assert pred.valid.shape == (1, 2) and bool(pred.valid.all())


# ------------------------------------------------------------------------ overfit check

LR, STEPS, TRACE = 2e-3, 200, False

@pytest.mark.slow
def test_overfit_class_loss_leaves_the_constant_prediction_level():
  """The real detector and train step (configs/detr.py:smoke made tiny, from scratch) on 8 fixed
  images of red / green squares: the last layer's class loss falls well below the level of the
  best constant prediction (the weighted entropy of the matched labels, which is what a DETR
  whose queries never specialise is stuck at) -- the queries learn which object is where."""
  import functools
  import optax
  from jaxdet.engine import config_cli, steps
  from jaxdet.engine.train_state import replicate
  from jaxdet.models.detectors import build_detector

  config = config_cli.load_config('configs/detr.py:smoke', [
      '--config.model.num_classes=2', '--config.model.backbone.base_width=8',
      '--config.model.backbone.frozen_stages=-1', '--config.model.neck.in_channels=(32,)',
      '--config.model.neck.out_channels=32', '--config.model.head.embed_dims=32',
      '--config.model.head.num_heads=4', '--config.model.head.num_decoder_layers=1',
      '--config.model.head.feedforward_channels=64', '--config.model.head.num_queries=4',
      '--config.model.head.dropout=0.0', '--config.model.head.match_method=host'])
  detector = build_detector(config.model)
  rng = np.random.default_rng(0)
  b, size, g = 8, 64, 2
  images = np.zeros((b, size, size, 3), np.uint8)
  boxes, labels = np.zeros((b, g, 4), np.float32), np.zeros((b, g), np.int32)
  mask = np.zeros((b, g), bool)
  for i in range(b):
    for j in range(1 + i % 2):
      s = rng.integers(14, 26)
      x, y = rng.integers(0, size - s, 2)
      labels[i, j], mask[i, j] = rng.integers(0, 2), True
      boxes[i, j] = x, y, x + s, y + s
      images[i, y:y + s, x:x + s, labels[i, j]] = 255
  batch = dict(image=images, gt_boxes=boxes, gt_labels=labels, gt_mask=mask,
               img_shape=np.full((b, 2), size, np.int32), image_valid=np.ones(b, bool))
  variables = detector.init(jax.random.key(0), (b, size, size, 3))
  tx = optax.adamw(LR, weight_decay=1e-4)
  state = dict(step=jnp.zeros((), jnp.int32), params=variables['params'],
               batch_stats=variables.get('batch_stats', {}),
               opt_state=tx.init(variables['params']))
  step = jax.pmap(functools.partial(steps.train_step, detector=detector, tx=tx,
                                    pipeline=config.data.pipeline, dtype=jnp.float32),
                  axis_name=steps.AXIS)
  evaluate = jax.pmap(functools.partial(steps.val_step, detector=detector,
                                        pipeline=config.data.pipeline, dtype=jnp.float32),
                      axis_name=steps.AXIS)
  state, dev_batch = replicate((state, batch))
  first = float(evaluate(state, dev_batch)['loss_cls'][0])
  for i in range(STEPS):
    state, metrics = step(state, dev_batch)
    if TRACE and i % 50 == 49:
      print(i + 1, float(metrics['loss_cls'][0]), float(evaluate(state, dev_batch)['loss_cls'][0]))
  last = float(evaluate(state, dev_batch)['loss_cls'][0])

  counts = np.bincount(labels[mask], minlength=2).astype(np.float64)
  weighted = np.append(counts, 0.1 * (b * 4 - counts.sum()))       # classes, background x 0.1
  p = weighted / weighted.sum()
  constant_level = -(p * np.log(p)).sum()
  print(f'class loss {first:.3f} -> {last:.3f}; constant-prediction level {constant_level:.3f}')
  assert first > 0.9 * constant_level
  assert last < 0.5 * constant_level


def test_bfloat16_head_close_to_float32():
  """dtype=bfloat16 computes in bf16 (float32 params, softmax and outputs): near the f32 result."""
  feats = (jax.random.normal(jax.random.key(0), (2, 3, 4, 32)),)
  img_shape = jnp.array([[96, 128], [64, 100]])
  v = jax.jit(lambda k: small_head().init(k, feats, img_shape, (96, 128)))(jax.random.key(1))
  run = lambda dtype: jax.jit(lambda: small_head(dtype=dtype).apply(
      v, feats, img_shape, (96, 128)))()
  (c32, b32), (c16, b16) = run(None), run(jnp.bfloat16)
  assert c16.dtype == b16.dtype == jnp.float32
  assert np.abs(c16 - c32).max() < 0.05 * np.abs(c32).max()
  assert np.abs(b16 - b32).max() < 0.02
