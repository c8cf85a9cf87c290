"""SSD modules, loss and prediction without PyTorch: exact parameter counts (REFERENCE.md), map
sizes, and hand-made cases (a single box, a perfect prediction, padding images)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxdet.assigners.max_iou import max_iou_assign
from jaxdet.models.backbones.vgg import SSDVGG
from jaxdet.models.heads import ssd_head
from jaxdet.models.necks.ssd_neck import SSDNeck
from jaxdet.ops.coders import delta_encode
from jaxdet.priors import ssd_num_base_anchors

RATIOS300 = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))
RATIOS512 = ((2,), (2, 3), (2, 3), (2, 3), (2, 3), (2,), (2,))
NECK512 = dict(out_channels=(512, 1024, 512, 256, 256, 256, 256), level_strides=(2, 2, 2, 2, 1),
               level_paddings=(1, 1, 1, 1, 1), last_kernel_size=4)


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _shapes(size, neck_kw, ratios, **vgg_kw):
  """Shape-only init of backbone, neck and head at `size` px: (counts, neck map shapes)."""
  image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  backbone, neck = SSDVGG(**vgg_kw), SSDNeck(**neck_kw)
  head = ssd_head.SSDHeadModule(num_classes=80, num_base_priors=ssd_num_base_anchors(ratios))
  feats = jax.eval_shape(lambda x: backbone.init_with_output(jax.random.key(0), x)[0], image)
  pyramid = jax.eval_shape(lambda f: neck.init_with_output(jax.random.key(0), f)[0], feats)
  counts = [_count(jax.eval_shape(m.init, jax.random.key(0), x)['params'])
            for m, x in ((backbone, image), (neck, feats), (head, pyramid))]
  return counts, [tuple(f.shape[1:3]) for f in pyramid]


@pytest.mark.parametrize('size,neck_kw,ratios,expected', [
    (300, {}, RATIOS300, (20_483_904, 2_460_032, 11_361_270)),
    (512, NECK512, RATIOS512, (20_483_904, 3_017_472, 12_536_820)),
])
def test_param_counts_equal_mmdet(size, neck_kw, ratios, expected):
  counts, maps = _shapes(size, neck_kw, ratios)
  assert tuple(counts) == expected
  assert sum(counts) == {300: 34_305_206, 512: 36_038_196}[size]
  sides = {300: (38, 19, 10, 5, 3, 1), 512: (64, 32, 16, 8, 4, 2, 1)}[size]
  assert maps == [(s, s) for s in sides]


def test_vgg_ceil_mode_and_narrow_variants():
  # ceil-mode pools: 75 -> 38 at 300 px, 101 -> 51 -> 26 -> 13 at 203 px.
  image = jax.ShapeDtypeStruct((2, 203, 150, 3), jnp.float32)
  for kw in (dict(), dict(base_width=8, depth=11, with_bn=True)):
    feats = jax.eval_shape(lambda x: SSDVGG(**kw).init_with_output(jax.random.key(0), x)[0],
                           image)
    w = kw.get('base_width', 64)
    assert [f.shape for f in feats] == [(2, 26, 19, 8 * w), (2, 13, 10, 16 * w)]
  with pytest.raises(ValueError, match='model.backbone.depth=12'):
    jax.eval_shape(SSDVGG(depth=12).init, jax.random.key(0), image)


def test_neck_l2norm_by_hand_and_too_small_input():
  neck = SSDNeck(in_channels=(3, 4), out_channels=(3, 4, 8), level_strides=(2,),
                 level_paddings=(1,))
  x0 = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 4, 3)), jnp.float32)
  x1 = jnp.ones((1, 2, 2, 4))
  variables = neck.init(jax.random.key(0), (x0, x1))
  out = neck.apply(variables, (x0, x1))
  want = 20 * x0 / (np.linalg.norm(np.asarray(x0), axis=-1, keepdims=True) + 1e-10)
  np.testing.assert_allclose(out[0], want, rtol=1e-6)
  assert out[2].shape == (1, 1, 1, 8)
  with pytest.raises(ValueError, match='too small'):
    SSDNeck().init(jax.random.key(0), (jnp.zeros((1, 4, 4, 512)), jnp.zeros((1, 2, 2, 1024))))


# ---------------------------------------------------------------------- loss, by hand

SIZES = ((8, 8), (4, 4), (2, 2), (1, 1))   # a 64 px input, strides 8..64


def small_cfg(num_classes=3):
  return ml_collections.ConfigDict(dict(
      input_size=300, basesize_ratio_range=(0.15, 0.9), strides=(8, 16, 32, 64),
      ratios=((2,), (2, 3), (2,), (2,)), min_sizes=(8, 16, 32, 48), max_sizes=(16, 32, 48, 64),
      target_means=(0., 0., 0., 0.), target_stds=(0.1, 0.1, 0.2, 0.2),
      pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0., gt_max_assign_all=False,
      neg_pos_ratio=3, smoothl1_beta=1.0, avg_factor='device'))


def one_box_batch(box=(20., 14., 45., 40.), label=2):
  gt = np.zeros((1, 3, 4), np.float32)
  gt[0, 1] = box
  return dict(gt_boxes=gt, gt_labels=np.array([[0, label, 0]], np.int32),
              gt_mask=np.array([[False, True, False]]), pad_shape=np.array([[64, 64]]),
              img_shape=np.array([[64, 64]]), image_valid=np.array([True]))


def outputs_from_flat(cls_flat, reg_flat, cfg):
  """(1, A, C + 1) and (1, A, 4) -> per-level NHWC maps in the priors' order."""
  nb = ssd_num_base_anchors(cfg.ratios)
  cls_out, reg_out, start = [], [], 0
  for (h, w), n in zip(SIZES, nb):
    end = start + h * w * n
    cls_out.append(cls_flat[:, start:end].reshape(1, h, w, -1))
    reg_out.append(reg_flat[:, start:end].reshape(1, h, w, -1))
    start = end
  return tuple(cls_out), tuple(reg_out)


def test_single_box_positives_and_perfect_prediction():
  cfg = small_cfg()
  batch = one_box_batch()
  anchors = np.asarray(ssd_head.ssd_anchors(cfg, SIZES))
  num = len(anchors)
  assign = max_iou_assign(anchors, batch['gt_boxes'][0], batch['gt_labels'][0],
                          batch['gt_mask'][0], pos_iou_thr=0.5, neg_iou_thr=0.5,
                          min_pos_iou=0., gt_max_assign_all=False)
  pos = np.asarray(assign.gt_index) == 1
  # By hand: the positives are the priors with IoU >= 0.5, plus the best one.
  from jaxdet.ops.boxes import box_iou
  iou = np.asarray(box_iou(anchors, batch['gt_boxes'][0, 1:2]))[:, 0]
  want = iou >= 0.5
  want[np.argmax(iou)] = True
  np.testing.assert_array_equal(pos, want)
  num_pos = int(pos.sum())
  assert 1 <= num_pos < num // 4

  # Perfect prediction: right class by a margin of 30, exact deltas -> loss ~ 0.
  cls = np.full((1, num, 4), -15., np.float32)
  cls[0, pos, 2] = 15.
  cls[0, ~pos, 3] = 15.
  reg = np.zeros((1, num, 4), np.float32)
  reg[0, pos] = np.asarray(delta_encode(anchors[pos], batch['gt_boxes'][0, 1],
                                        stds=cfg.target_stds))
  loss_fn = jax.jit(lambda o, b: ssd_head.ssd_loss(o, b, cfg))
  best = loss_fn(outputs_from_flat(cls, reg, cfg), batch)
  assert float(best['num_pos']) == num_pos and float(best['avg_factor']) == num_pos
  assert float(best['loss_cls']) < 1e-10 and float(best['loss_bbox']) < 1e-10
  # Every single change away from it costs: a wrong class on a positive, a confident
  # false positive among the negatives, a shifted box.
  for change in ('pos_class', 'neg_class', 'box'):
    c, r = cls.copy(), reg.copy()
    i = np.flatnonzero(pos)[0]
    if change == 'pos_class':
      c[0, i, 0] = 25.
    elif change == 'neg_class':
      c[0, np.flatnonzero(~pos)[7], 1] = 25.
    else:
      r[0, i, 0] += 5.
    worse = loss_fn(outputs_from_flat(c, r, cfg), batch)
    assert float(worse['loss_cls'] + worse['loss_bbox']) > 0.1, change
  # Only the mined negatives count: a wrong background logit on more than 3 num_pos
  # negatives gives the loss of exactly 3 num_pos of them.
  c = cls.copy()
  c[0, ~pos, 3] = 0.
  c[0, ~pos, 0] = 0.
  per_anchor = np.log(1 + 2 * np.exp(-15.) + np.exp(0.)) - 0.
  got = float(loss_fn(outputs_from_flat(c, reg, cfg), batch)['loss_cls'])
  np.testing.assert_allclose(got, 3 * num_pos * per_anchor / num_pos, rtol=1e-5)


def test_padding_images_and_empty_images():
  cfg = small_cfg()
  batch = one_box_batch()
  rng = np.random.default_rng(0)
  num = sum(h * w * n for (h, w), n in zip(SIZES, ssd_num_base_anchors(cfg.ratios)))
  cls = rng.normal(size=(2, num, 4)).astype(np.float32)
  reg = rng.normal(size=(2, num, 4)).astype(np.float32)
  loss_fn = jax.jit(lambda o, b: ssd_head.ssd_loss(o, b, cfg))
  o1 = outputs_from_flat(cls[:1], reg[:1], cfg)
  o2 = outputs_from_flat(cls[1:], reg[1:], cfg)
  one = loss_fn(o1, batch)
  # The same image next to a different one flagged image_valid False: nothing changes.
  two_batch = {k: np.concatenate([v, v]) for k, v in batch.items()}
  two_batch['image_valid'] = np.array([True, False])
  both = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), o1, o2)
  two = loss_fn(both, two_batch)
  for key in one:
    np.testing.assert_allclose(float(two[key]), float(one[key]), rtol=1e-6)
  # A real image without gts: no positives, normaliser 1, no negatives mined, loss 0.
  empty = dict(batch, gt_mask=np.zeros((1, 3), bool))
  out = loss_fn(o1, empty)
  assert float(out['avg_factor']) == 1. and float(out['loss_cls']) == 0.
  assert float(out['loss_bbox']) == 0.
  with pytest.raises(ValueError, match='model.head.avg_factor'):
    cfg.avg_factor = 'batch'
    ssd_head.ssd_loss(o1, batch, cfg)


def test_predict_one_confident_prior_in_original_pixels():
  """A 64x40 input resized from a 128x60 (w x h) original and flipped; one prior scores ~1 for
  class 1; a second confident prior lies right of the image (img_shape w 40) and decodes to a
  zero-width box after clipping: dropped. Everything else is background."""
  cfg = small_cfg()
  test_cfg = ml_collections.ConfigDict(dict(nms_pre=1000, score_thr=0.02, iou_threshold=0.45,
                                            max_per_img=200, min_bbox_size=0.0))
  anchors = np.asarray(ssd_head.ssd_anchors(cfg, SIZES))
  num = len(anchors)
  img_h, img_w = 64, 40
  inside = np.flatnonzero((anchors[:, 0] > 1) & (anchors[:, 2] < img_w - 1)
                          & (anchors[:, 1] > 1) & (anchors[:, 3] < img_h - 1))
  outside = np.flatnonzero(anchors[:, 0] >= img_w)
  i, j = inside[len(inside) // 2], outside[0]
  cls = np.full((1, num, 4), -10., np.float32)
  cls[0, :, 3] = 10.                       # background everywhere ...
  cls[0, [i, j], 3] = -10.
  cls[0, [i, j], 1] = 10.                  # ... except two priors sure of class 1
  reg = np.zeros((1, num, 4), np.float32)  # boxes = the priors themselves
  batch = dict(img_shape=np.array([[img_h, img_w]], np.int32),
               scale_factor=np.array([[0.5, 64 / 60]], np.float32),   # (w, h)
               offset=np.zeros((1, 2), np.float32), flip=np.array([True]))
  pred = jax.jit(lambda o, b: ssd_head.ssd_predict(o, b, cfg, test_cfg))(
      outputs_from_flat(cls, reg, cfg), batch)
  assert pred.boxes.shape == (1, 200, 4)
  assert int(pred.valid.sum()) == 1
  assert int(pred.labels[0, 0]) == 1 and float(pred.scores[0, 0]) > 0.999
  x1, y1, x2, y2 = anchors[i]
  want = [(img_w - x2) / 0.5, y1 / (64 / 60), (img_w - x1) / 0.5, y2 / (64 / 60)]
  np.testing.assert_allclose(np.asarray(pred.boxes[0, 0]), want, rtol=1e-5)


@pytest.mark.parametrize('spec,expected', [
    ('ssd300.py', dict(total=34_305_206, backbone=20_483_904, neck=2_460_032, head=11_361_270)),
    ('ssd512.py', dict(total=36_038_196, backbone=20_483_904, neck=3_017_472, head=12_536_820)),
])
def test_full_config_param_count(spec, expected):
  """`jaxdet.info`'s count of the whole detector of a config (shape-only)."""
  import os
  from jaxdet import info
  from jaxdet.engine import config_cli
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = config_cli.load_config(os.path.join(root, 'configs', spec))
  assert info.count_params(config) == expected


def test_configs_recipe():
  """mmdetection's SSD recipe: SGD 2e-3 for 64 images, momentum 0.9, wd 5e-4, no clip, linear
  warmup 500 iters from 0.001, 24 epochs of the 5x repeated set (= 120 passes), steps 16 / 22."""
  import os
  from jaxdet.engine import config_cli
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for spec, size in (('ssd300.py', 300), ('ssd512.py', 512)):
    c = config_cli.load_config(os.path.join(root, 'configs', spec))
    o, s = c.optimizer, c.schedule
    assert (o.name, o.base_lr, o.base_batch, o.momentum, o.weight_decay, o.grad_clip) == (
        'sgd', 2e-3, 64, 0.9, 5e-4, None)
    assert (s.warmup, s.warmup_iters, s.warmup_ratio, s.gamma) == ('linear', 500, 0.001, 0.1)
    repeat = c.data.get('repeat', 1)
    passes = s.epochs * (repeat if 'repeat' in c.data else 1)
    assert passes == 120 and tuple(m * (120 // s.epochs) for m in s.milestones) == (80, 110)
    assert c.data.img_scale == (size, size) and c.data.pipeline.kind == 'ssd'
    assert tuple(c.data.pipeline.std) == (1., 1., 1.)
    assert c.model.test_cfg.to_dict() == dict(nms_pre=1000, score_thr=0.02, iou_threshold=0.45,
                                              max_per_img=200, min_bbox_size=0.0)
  smoke = config_cli.load_config(os.path.join(root, 'configs', 'ssd300.py:smoke'))
  assert smoke.data.source == 'shapes' and smoke.model.num_classes == 5


def test_smoke_norm_variants_params():
  """with_bn / norm='bn' (the smoke's from-scratch model): every VGG conv (conv6 / conv7
  included) gets a BatchNorm; the neck's convs lose their bias for one (mmcv ConvModule)."""
  image = jax.ShapeDtypeStruct((1, 160, 160, 3), jnp.float32)
  plain = jax.eval_shape(SSDVGG(base_width=8).init, jax.random.key(0), image)
  bn = jax.eval_shape(SSDVGG(base_width=8, with_bn=True).init, jax.random.key(0), image)
  widths = [8, 8, 16, 16, 32, 32, 32, 64, 64, 64, 64, 64, 64, 128, 128]
  assert _count(bn['params']) == _count(plain['params']) + 2 * sum(widths)
  assert _count(bn['batch_stats']) == 2 * sum(widths)
  feats = (jnp.zeros((1, 20, 20, 64)), jnp.zeros((1, 10, 10, 128)))
  kw = dict(in_channels=(64, 128), out_channels=(64, 128, 64, 32, 32), level_strides=(2, 2, 1),
            level_paddings=(1, 1, 0))
  plain = jax.eval_shape(SSDNeck(**kw).init, jax.random.key(0), feats)
  bn = jax.eval_shape(SSDNeck(norm='bn', **kw).init, jax.random.key(0), feats)
  convs = [32, 64, 16, 32, 16, 32]  # (1x1, 3x3) per extra level
  assert _count(bn['params']) == _count(plain['params']) - sum(convs) + 2 * sum(convs)
  with pytest.raises(ValueError, match="model.neck.norm='gn'"):
    SSDNeck(norm='gn', **kw).init(jax.random.key(0), feats)
