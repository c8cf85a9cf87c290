"""SSD against mmdetection 3.3 itself: SSDVGG + SSDNeck + SSDHead forward with the same weights
(mapped by the modules' PyTorch name tables), `SSDHead.loss_by_feat` on the same random head
outputs and scenes, and MaxIoUAssigner(gt_max_assign_all=False) on scenes built to share best
priors."""
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxdet.assigners.max_iou import max_iou_assign
from jaxdet.models.backbones import vgg
from jaxdet.models.heads import ssd_head
from jaxdet.models.necks import ssd_neck
from jaxdet.priors import ssd_anchor_grid

import mmdet_compat

pytestmark = pytest.mark.torch
torch = pytest.importorskip('torch')
pytest.importorskip('mmdet')

SSD300 = dict(input_size=300, basesize_ratio_range=(0.15, 0.9), strides=(8, 16, 32, 64, 100, 300),
              ratios=((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)))
SSD512 = dict(input_size=512, basesize_ratio_range=(0.1, 0.9),
              strides=(8, 16, 32, 64, 128, 256, 512),
              ratios=((2,), (2, 3), (2, 3), (2, 3), (2, 3), (2,), (2,)))
FEATS = {300: (38, 19, 10, 5, 3, 1), 512: (64, 32, 16, 8, 4, 2, 1)}
NECK512 = dict(out_channels=(512, 1024, 512, 256, 256, 256, 256), level_strides=(2, 2, 2, 2, 1),
               level_paddings=(1, 1, 1, 1, 1), last_kernel_size=4)
TRAIN = dict(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0., gt_max_assign_all=False)


mm = mmdet_compat.mmdet  # mmdetection's registries (tests/mmdet_compat.py)


def head_cfg(spec, num_classes=80):
  return ml_collections.ConfigDict(dict(
      spec, min_sizes=(), max_sizes=(), target_means=(0., 0., 0., 0.),
      target_stds=(0.1, 0.1, 0.2, 0.2), neg_pos_ratio=3, smoothl1_beta=1.0, avg_factor='device',
      **TRAIN))


def mm_head(spec, num_classes=80):
  in_channels = (512, 1024, 512, 256, 256, 256, 256)[:len(spec['strides'])]
  return mm()['MODELS'].build(dict(
      type='SSDHead', num_classes=num_classes, in_channels=in_channels,
      anchor_generator=dict(type='SSDAnchorGenerator', scale_major=False,
                            input_size=spec['input_size'],
                            basesize_ratio_range=spec['basesize_ratio_range'],
                            strides=list(spec['strides']),
                            ratios=[list(r) for r in spec['ratios']]),
      bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0.] * 4,
                      target_stds=[0.1, 0.1, 0.2, 0.2]),
      train_cfg=dict(assigner=dict(type='MaxIoUAssigner', ignore_iof_thr=-1, **TRAIN),
                     sampler=dict(type='PseudoSampler'), smoothl1_beta=1., allowed_border=-1,
                     pos_weight=-1, neg_pos_ratio=3, debug=False)))


# ------------------------------------------------------------------------------- forward

def _to_jax_variables(state_dict, rules, jax_params):
  """Torch tensors -> a params pytree shaped like `jax_params` through (regex, template) rules
  (4-d weight -> kernel HWIO, 1-d weight -> scale, bias -> bias); every leaf filled once."""
  flat = {}
  for name, tensor in state_dict.items():
    module, leaf = name.rsplit('.', 1)
    for pattern, template in rules:
      if re.fullmatch(pattern, module):
        path = tuple(re.sub(pattern, template, module).split('/'))
        break
    else:
      raise AssertionError(f'no rule for {name}')
    value = tensor.detach().numpy()
    key = {('weight', 4): 'kernel', ('weight', 1): 'scale', ('bias', 1): 'bias'}[
        (leaf, value.ndim)]
    flat[path + (key,)] = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
  paths = {tuple(k.key for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(
      jax_params)[0]}
  assert set(flat) == set(paths), set(flat) ^ set(paths)
  for p, v in flat.items():
    assert v.shape == paths[p].shape, (p, v.shape, paths[p].shape)
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(jax_params),
                                      [flat[p] for p in paths])


@pytest.mark.parametrize('size', [300, 512])
def test_forward_equals_mmdet(size):
  """Backbone, neck and head outputs on the same random weights and image."""
  spec, neck_kw = (SSD300, {}) if size == 300 else (SSD512, NECK512)
  torch.manual_seed(size)
  backbone = mm()['MODELS'].build(dict(type='SSDVGG', depth=16, with_last_pool=False,
                                       ceil_mode=True, out_indices=(3, 4),
                                       out_feature_indices=(22, 34)))
  neck = mm()['MODELS'].build(dict(type='SSDNeck', in_channels=(512, 1024),
                                   out_channels=neck_kw.get('out_channels',
                                                            (512, 1024, 512, 256, 256, 256)),
                                   level_strides=neck_kw.get('level_strides', (2, 2, 1, 1)),
                                   level_paddings=neck_kw.get('level_paddings', (1, 1, 0, 0)),
                                   last_kernel_size=neck_kw.get('last_kernel_size', 3),
                                   l2_norm_scale=20))
  head = mm_head(spec)
  for m in (backbone, neck, head):
    m.init_weights()
    m.eval()
  with torch.no_grad():
    neck.l2_norm.weight.uniform_(10, 30)
    for conv in list(head.cls_convs) + list(head.reg_convs):
      conv[0].bias.uniform_(-1, 1)
  image = torch.rand(1, 3, size, size) * 255 - 120
  with torch.no_grad():
    feats = backbone(image)
    pyramid = neck(feats)
    cls_t, reg_t = head(pyramid)

  jb = vgg.SSDVGG()
  jn = ssd_neck.SSDNeck(**neck_kw)
  jh = ssd_head.ssd_head_module(head_cfg(spec), 80)
  x = jnp.asarray(image.numpy().transpose(0, 2, 3, 1))
  pb = jax.eval_shape(jb.init, jax.random.key(0), x[:, :64, :64])['params']
  pn = jax.eval_shape(jn.init, jax.random.key(0),
                      tuple(jnp.zeros((1, s, s, c)) for s, c in zip(FEATS[size][:2], (512, 1024))))
  pn = pn['params']
  pyr_shapes = tuple(jnp.zeros((1, s, s, c)) for s, c in zip(
      FEATS[size], (512, 1024, 512, 256, 256, 256, 256)))
  ph = jax.eval_shape(jh.init, jax.random.key(0), pyr_shapes)['params']
  pb = _to_jax_variables(backbone.state_dict(), vgg.TORCH_NAMES, pb)
  pn = _to_jax_variables(neck.state_dict(), ssd_neck.TORCH_NAMES, pn)
  ph = _to_jax_variables(head.state_dict(), ssd_head.TORCH_NAMES, ph)

  out_b = jax.jit(lambda p, x: jb.apply({'params': p}, x))(pb, x)
  out_n = jax.jit(lambda p, f: jn.apply({'params': p}, f))(pn, out_b)
  cls_j, reg_j = jax.jit(lambda p, f: jh.apply({'params': p}, f))(ph, out_n)

  def rel(a, b):
    b = b.detach().numpy().transpose(0, 2, 3, 1)
    a = np.asarray(a)
    assert a.shape == b.shape
    return np.abs(a - b).max() / np.abs(b).max()
  for a, b in zip(out_b, feats):
    assert rel(a, b) < 1e-5
  for a, b in zip(out_n, pyramid):
    assert rel(a, b) < 1e-5
  for a, b in zip(cls_j + reg_j, cls_t + reg_t):
    assert rel(a, b) < 1e-4


# ---------------------------------------------------------------------------------- loss

def random_scene(rng, pad_hw, num_real, slots=24):
  """Boxes of many sizes (3..250 px), some duplicated or nested (shared best priors), one tiny
  (no prior reaches IoU 0.5), some outside a padded image's area; padded to `slots` rows."""
  h, w = pad_hw
  size = np.exp(rng.uniform(np.log(3), np.log(250), (num_real, 2)))
  xy = rng.uniform(0, 1, (num_real, 2)) * np.maximum([300 - size[:, 0], 300 - size[:, 1]], 0).T
  boxes = np.concatenate([xy, xy + size], 1)
  if num_real >= 4:
    boxes[-1] = boxes[0]                                  # the same best prior
    boxes[-2] = boxes[1] + np.array([0.5, 0.5, -0.5, -0.5])  # very likely the same best prior
    boxes[2] = [100.2, 100.3, 103.1, 104.0]                # tiny: best IoU far below 0.5
  if num_real >= 6 and (h < 300 or w < 300):
    boxes[3] = [w + 2., h + 2., 299., 299.]                # in the padding: IoU 0 with all valid
  boxes = boxes.astype(np.float32)
  rows = np.sort(rng.choice(slots, num_real, replace=False))
  gt = rng.normal(0, 1e3, (slots, 4)).astype(np.float32)
  labels = np.full(slots, -3, np.int32)
  mask = np.zeros(slots, bool)
  gt[rows], labels[rows], mask[rows] = boxes, rng.integers(0, 80, num_real), True
  return gt, labels, mask


def test_loss_equals_mmdet_loss_by_feat():
  spec = SSD300
  rng = np.random.default_rng(0)
  pads = [(300, 300), (300, 300), (260, 280), (300, 300)]
  scenes = [random_scene(rng, pads[0], 12), random_scene(rng, pads[1], 1),
            random_scene(rng, pads[2], 8), random_scene(rng, pads[3], 0)]
  nb = (4, 6, 6, 6, 4, 4)
  cls_t = [torch.from_numpy(rng.normal(0, 2, (4, n * 81, s, s)).astype(np.float32))
           for n, s in zip(nb, FEATS[300])]
  reg_t = [torch.from_numpy(rng.normal(0, 1, (4, n * 4, s, s)).astype(np.float32))
           for n, s in zip(nb, FEATS[300])]
  gts, metas = [], []
  for (g, l, m), pad in zip(scenes, pads):
    data = mm()['InstanceData']()
    data.bboxes = torch.from_numpy(g[m])
    data.labels = torch.from_numpy(l[m]).long()
    gts.append(data)
    metas.append(dict(img_shape=pad, pad_shape=pad, batch_input_shape=(300, 300)))
  want = mm_head(spec).loss_by_feat(cls_t, reg_t, gts, metas)
  want_cls = float(sum(x.sum() for x in want['loss_cls']))
  want_bbox = float(sum(x.sum() for x in want['loss_bbox']))

  batch = dict(gt_boxes=np.stack([s[0] for s in scenes]),
               gt_labels=np.stack([s[1] for s in scenes]),
               gt_mask=np.stack([s[2] for s in scenes]),
               pad_shape=np.array(pads, np.int32), img_shape=np.array(pads, np.int32),
               image_valid=np.ones(4, bool))
  nhwc = lambda ts: tuple(jnp.asarray(t.numpy().transpose(0, 2, 3, 1)) for t in ts)
  outputs = (nhwc(cls_t), nhwc(reg_t))
  cfg = head_cfg(spec)
  got = jax.jit(lambda o, b: ssd_head.ssd_loss(o, b, cfg))(outputs, batch)
  np.testing.assert_allclose(float(got['loss_cls']), want_cls, rtol=2e-6)
  np.testing.assert_allclose(float(got['loss_bbox']), want_bbox, rtol=2e-6)
  assert float(got['num_pos']) > 20

  # An extra image flagged image_valid False (evaluation padding) changes nothing.
  junk = {k: np.concatenate([v, v[:1]]) for k, v in batch.items()}
  junk['image_valid'][-1] = False
  outputs5 = jax.tree_util.tree_map(lambda x: jnp.concatenate([x, x[:1] * 3]), outputs)
  got5 = jax.jit(lambda o, b: ssd_head.ssd_loss(o, b, cfg))(outputs5, junk)
  for key in ('loss_cls', 'loss_bbox', 'avg_factor', 'num_pos'):
    np.testing.assert_allclose(float(got5[key]), float(got[key]), rtol=1e-6)


# ----------------------------------------------------------------------------- assigner

@pytest.mark.parametrize('spec', [SSD300, SSD512], ids=['300', '512'])
def test_max_iou_shared_best_priors_equal_mmdet(spec):
  """gt_max_assign_all=False: each gt's single best prior (first on ties), later gt wins."""
  size = spec['input_size']
  feats = [(s, s) for s in FEATS[size]]
  anchors = np.array(ssd_anchor_grid(feats, **spec))
  gen = mm()['TASK_UTILS'].build(dict(type='SSDAnchorGenerator', scale_major=False,
                                      input_size=size,
                                      basesize_ratio_range=spec['basesize_ratio_range'],
                                      strides=list(spec['strides']),
                                      ratios=[list(r) for r in spec['ratios']]))
  np.testing.assert_array_equal(anchors, torch.cat(gen.grid_priors(feats, device='cpu')).numpy())
  rng = np.random.default_rng(size)
  assigner = mm()['TASK_UTILS'].build(dict(type='MaxIoUAssigner', **TRAIN))
  fn = jax.jit(jax.vmap(lambda g, l, m: max_iou_assign(anchors, g, l, m, **TRAIN)))
  scenes = []
  for n in (4, 9, 24):
    g, l, m = random_scene(rng, (size, size), n, slots=32)
    rows = np.flatnonzero(m)
    # Three gts that are exact copies of a prior: their best prior is that prior, and for
    # a copy shared by two gts the later one must win.
    pick = rng.choice(len(anchors), 2, replace=False)
    g[rows[0]], g[rows[1]], g[rows[-1]] = anchors[pick[0]], anchors[pick[1]], anchors[pick[0]]
    scenes.append((g, l, m))
  out = fn(*(np.stack(x) for x in zip(*scenes)))
  shared = 0
  for b, (g, l, m) in enumerate(scenes):
    data = mm()['InstanceData']()
    data.bboxes, data.labels = torch.from_numpy(g[m]), torch.from_numpy(l[m]).long()
    priors = mm()['InstanceData']()
    priors.priors = torch.from_numpy(anchors)
    want = assigner.assign(priors, data)
    rows = np.flatnonzero(m)
    inds = want.gt_inds.numpy()
    want_index = np.where(inds > 0, rows[np.maximum(inds - 1, 0)], np.where(inds == 0, -1, -2))
    np.testing.assert_array_equal(np.asarray(out.gt_index[b]), want_index)
    np.testing.assert_array_equal(np.asarray(out.labels[b]), want.labels.numpy())
    best = np.asarray(out.gt_index[b])[int(np.flatnonzero(
        (anchors == g[rows[0]]).all(1))[0])]
    shared += best == rows[-1]
  assert shared == len(scenes)
