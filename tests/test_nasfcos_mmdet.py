"""NAS-FCOS's FPN and head against mmdetection 3.3's `NASFCOS_FPN` / `NASFCOSHead`.

mmcv-lite has no compiled deformable convolution, so mmcv's `ModulatedDeformConv2dPack.forward`
is replaced by one calling `torchvision.ops.deform_conv2d` (same offset / mask layout); the first
test checks that replacement against a slow transcription of mmcv's CUDA kernel
(`modulated_deformable_im2col_gpu_kernel` + `dmcn_im2col_bilinear`). The model is mmdetection's
own config (`nas-fcos_r50-caffe_fpn_nashead-gn-head_4xb4-1x_coco.py`), randomly initialised with
random non-zero offset convs, BN statistics, norm affines and scales, its weights mapped by
`TORCH_NAMES`; two images of different sizes (one not a multiple of 32, so every resize of the
FPN is fractional).
"""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdet.models.backbones.resnet import TORCH_NAMES as RESNET
from jaxdet.models.backbones.resnet import ResNet
from jaxdet.models.heads import nasfcos_head
from jaxdet.models.necks import nasfcos_fpn
from jaxdet.models.weights import torch_to_flax

import mmdet_compat


pytestmark = pytest.mark.torch
torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')
pytest.importorskip('mmdet')

IMAGES = ((96, 128), (100, 140))  # (H, W)
RTOL = 1e-4
CHAIN_RTOL = 1e-3


def tv_forward(self, x):
  """mmcv `ModulatedDeformConv2dPack.forward` with torchvision's kernel."""
  o1, o2, mask = torch.chunk(self.conv_offset(x), 3, dim=1)
  return torchvision.ops.deform_conv2d(x, torch.cat((o1, o2), dim=1), self.weight, self.bias,
                                       self.stride, self.padding, self.dilation,
                                       torch.sigmoid(mask))


@functools.lru_cache(maxsize=None)
def mmcv_dcn():
  mmdet_compat.stub_compiled_ops()
  from mmcv.ops.modulated_deform_conv import ModulatedDeformConv2dPack
  ModulatedDeformConv2dPack.forward = tv_forward
  return ModulatedDeformConv2dPack


def mmcv_formula(x, offset, mask, weight, bias, stride, pad, dg):
  """mmcv's CUDA DCNv2 written out (NCHW numpy, float64): im2col with its bilinear rule, then
  weight @ columns + bias."""
  b, cin, h, w = x.shape
  cout, _, kh, kw = weight.shape
  ho = (h + 2 * pad - kh) // stride + 1
  wo = (w + 2 * pad - kw) // stride + 1
  cols = np.zeros((b, cin, kh, kw, ho, wo))
  off = offset.reshape(b, dg, kh * kw, 2, ho, wo)
  msk = mask.reshape(b, dg, kh * kw, ho, wo)
  for n in range(b):
    for c in range(cin):
      g = c // (cin // dg)
      img = x[n, c]
      for i in range(kh):
        for j in range(kw):
          k = i * kw + j
          for y in range(ho):
            for xo in range(wo):
              h_im = y * stride - pad + i + off[n, g, k, 0, y, xo]
              w_im = xo * stride - pad + j + off[n, g, k, 1, y, xo]
              val = 0.0
              if -1 < h_im < h and -1 < w_im < w:  # the kernel's sampling condition
                hl, wl = int(np.floor(h_im)), int(np.floor(w_im))
                lh, lw = h_im - hl, w_im - wl
                v = lambda yy, xx: img[yy, xx] if 0 <= yy < h and 0 <= xx < w else 0.0
                val = ((1 - lh) * (1 - lw) * v(hl, wl) + (1 - lh) * lw * v(hl, wl + 1)
                       + lh * (1 - lw) * v(hl + 1, wl) + lh * lw * v(hl + 1, wl + 1))
              cols[n, c, i, j, y, xo] = val * msk[n, g, k, y, xo]
  out = np.einsum('ocij,ncijyx->noyx', weight, cols)
  return out + bias[None, :, None, None]


def test_torchvision_replacement_equals_mmcv_formula():
  Pack = mmcv_dcn()
  torch.manual_seed(0)
  layer = Pack(4, 3, 3, padding=1, deform_groups=2, bias=True).double()
  with torch.no_grad():  # offsets of a few pixels: samples across and beyond the border
    layer.conv_offset.weight.normal_(0, 0.2)
    layer.conv_offset.bias.normal_(0, 1.0)
    layer.weight.normal_(0, 1)
    layer.bias.normal_(0, 1)
  x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
  with torch.no_grad():
    ours = layer(x).numpy()
    o1, o2, m = torch.chunk(layer.conv_offset(x), 3, dim=1)
    offset = torch.cat((o1, o2), 1).numpy()
  ref = mmcv_formula(x.numpy(), offset, torch.sigmoid(m).numpy(), layer.weight.detach().numpy(),
                     layer.bias.detach().numpy(), 1, 1, 2)
  assert 2 < np.abs(offset).max() < 8 and np.abs(ref).max() > 1
  np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-10)


@functools.lru_cache(maxsize=None)
def mmdet_model():
  """mmdetection's NAS-FCOS (its own config, 80 classes), random weights, eval mode."""
  mmcv_dcn()
  model, _ = mmdet_compat.build_model(
      'nas_fcos/nas-fcos_r50-caffe_fpn_nashead-gn-head_4xb4-1x_coco.py', seed=0)
  gen = torch.Generator().manual_seed(1)
  rand = lambda t, lo, hi: t.copy_(torch.rand(t.shape, generator=gen) * (hi - lo) + lo)
  with torch.no_grad():
    for name, module in model.named_modules():
      if name.endswith('conv_offset'):  # offsets of about +-1 px, masks away from 0.5
        module.weight.normal_(0, 0.01, generator=gen)
        module.bias.normal_(0, 0.5, generator=gen)
      elif isinstance(module, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
        rand(module.weight, 0.5, 1.5)
        rand(module.bias, -0.2, 0.2)
        if isinstance(module, torch.nn.BatchNorm2d):
          rand(module.running_mean, -0.2, 0.2)
          rand(module.running_var, 0.5, 2.0)
    for scale in model.bbox_head.scales:
      rand(scale.scale, 0.5, 1.5)
    rand(model.bbox_head.conv_cls.bias, -4.5, -1.0)  # many scores above score_thr 0.05
  return model.eval()


def _part(state, prefix):
  return {k[len(prefix):]: v.numpy() for k, v in state.items() if k.startswith(prefix)}


@functools.lru_cache(maxsize=None)
def jax_parts():
  """jaxdet's backbone / neck / head with mmdetection's weights (mapped by name)."""
  state = mmdet_model().state_dict()
  parts = {}
  for prefix, module, rules, inputs in (
      ('backbone.', ResNet(depth=50, style='caffe', bn_eps=0.0), RESNET,
       (jnp.zeros((1, 64, 64, 3)),)),
      ('neck.', nasfcos_fpn.NASFCOS_FPN(), nasfcos_fpn.TORCH_NAMES,
       (tuple(jnp.zeros((1, 64 // 2 ** i, 64 // 2 ** i, c))
              for i, c in enumerate((256, 512, 1024, 2048))),)),
      ('bbox_head.', nasfcos_head.NASFCOSHead(num_classes=80), nasfcos_head.TORCH_NAMES,
       (tuple(jnp.zeros((1, 16 // 2 ** i, 16 // 2 ** i, 256)) for i in range(5)),)),
  ):
    target = jax.eval_shape(module.init, jax.random.key(0), *inputs)
    variables, _ = torch_to_flax(_part(state, prefix), rules, target, what=prefix)
    parts[prefix] = (module, variables)
  return parts


def nchw_to_nhwc(t):
  return jnp.asarray(t.detach().numpy().transpose(0, 2, 3, 1))


def rel_diff(ours, theirs):
  theirs = np.asarray(theirs)
  return float(np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max())


@functools.lru_cache(maxsize=None)
def torch_run(hw):
  model = mmdet_model()
  gen = torch.Generator().manual_seed(hw[0])
  image = torch.randn((1, 3) + hw, generator=gen) * 50
  with torch.no_grad():
    feats = model.backbone(image)
    neck = model.neck(feats)
    head = model.bbox_head(neck)
  return image, feats, neck, head


@pytest.mark.parametrize('hw', IMAGES)
def test_neck_equals_mmdet(hw):
  _, feats, neck, _ = torch_run(hw)
  module, variables = jax_parts()['neck.']
  ours = module.apply(variables, tuple(nchw_to_nhwc(f) for f in feats))
  assert len(ours) == len(neck) == 5
  for level, (a, b) in enumerate(zip(ours, neck)):
    b = b.numpy().transpose(0, 2, 3, 1)
    assert a.shape == b.shape, (level, a.shape, b.shape)
    assert rel_diff(a, b) < RTOL, (level, rel_diff(a, b))


@pytest.mark.parametrize('hw', IMAGES)
def test_head_equals_mmdet(hw):
  _, _, neck, (cls, reg, ctr) = torch_run(hw)
  module, variables = jax_parts()['bbox_head.']
  ours = module.apply(variables, tuple(nchw_to_nhwc(f) for f in neck))
  # mmdetection's forward returns exp'd distances; jaxdet the scaled log-distances.
  theirs = (cls, [torch.log(r) for r in reg], ctr)
  for name, a_levels, b_levels in zip(('cls', 'reg', 'ctr'), ours, theirs):
    for level, (a, b) in enumerate(zip(a_levels, b_levels)):
      b = b.numpy().transpose(0, 2, 3, 1)
      assert a.shape == b.shape, (name, level, a.shape, b.shape)
      assert rel_diff(a, b) < RTOL, (name, level, rel_diff(a, b))


@pytest.mark.parametrize('hw', IMAGES)
def test_backbone_neck_head_chain_equals_mmdet(hw):
  """The whole network from the image (caffe ResNet-50 with BN eps 0 included). The backbone and
  neck stay within ~3e-6 of mmdetection's; the randomly initialised head is ill-conditioned (a
  2e-6 relative perturbation of its input moves its regression output by up to 1e-4, measured),
  so the chain's head outputs are held to CHAIN_RTOL (measured: 1.5e-4)."""
  image, _, neck, (cls, reg, ctr) = torch_run(hw)
  parts = jax_parts()
  x = nchw_to_nhwc(image)
  for prefix in ('backbone.', 'neck.', 'bbox_head.'):
    module, variables = parts[prefix]
    x = module.apply(variables, x)
    if prefix == 'neck.':
      for a, b in zip(x, neck):
        assert rel_diff(a, b.numpy().transpose(0, 2, 3, 1)) < RTOL / 10
  for a_levels, b_levels in zip(x, (cls, [torch.log(r) for r in reg], ctr)):
    for a, b in zip(a_levels, b_levels):
      assert rel_diff(a, b.numpy().transpose(0, 2, 3, 1)) < CHAIN_RTOL


def test_neck_train_mode_equals_mmdet():
  """BN with batch statistics (2 images): outputs and the updated running statistics."""
  model = mmdet_model()
  gen = torch.Generator().manual_seed(5)
  feats = [torch.randn((2, c, 12 // 2 ** i, 16 // 2 ** i), generator=gen)
           for i, c in enumerate((256, 512, 1024, 2048))]
  neck = model.neck
  before = {k: v.clone() for k, v in neck.state_dict().items()}
  try:
    neck.train()
    with torch.no_grad():
      theirs = neck(feats)
    after = {k: v.numpy().copy() for k, v in neck.state_dict().items()}
  finally:
    neck.load_state_dict(before)
    neck.eval()
  module, variables = jax_parts()['neck.']
  ours, mutated = module.apply(variables, tuple(nchw_to_nhwc(f) for f in feats), train=True,
                               mutable=['batch_stats'])
  for a, b in zip(ours, theirs):
    assert rel_diff(a, b.numpy().transpose(0, 2, 3, 1)) < RTOL
  updated, _ = torch_to_flax(after, nasfcos_fpn.TORCH_NAMES, jax.eval_shape(lambda: variables))
  flat_ours = jax.tree_util.tree_leaves_with_path(mutated['batch_stats'])
  flat_theirs = dict(jax.tree_util.tree_leaves_with_path(updated['batch_stats']))
  assert len(flat_ours) == 44  # 3 adapt + 12 input + 7 out BNs, mean and var each
  for path, value in flat_ours:
    np.testing.assert_allclose(value, flat_theirs[path], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------- conversion (CLI) and detections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOX_ATOL = 0.01  # px


@functools.lru_cache(maxsize=None)
def converted(tmp_dir):
  """mmdetection's state_dict saved as a .pth and converted by `python -m jaxdet.convert`."""
  from jaxdet import convert
  from jaxdet.engine import checkpoint as ckpt
  pth = os.path.join(tmp_dir, 'nas_fcos_mmdet.pth')
  torch.save(dict(state_dict=mmdet_model().state_dict()), pth)
  out = os.path.join(tmp_dir, 'converted')
  convert.main(['--config', os.path.join(ROOT, 'configs', 'nas_fcos.py'), '--from-mmdet', pth,
                '--out', out])
  return ckpt.load_params(out)


@pytest.fixture(scope='module')
def converted_variables(tmp_path_factory):
  return converted(str(tmp_path_factory.mktemp('nasfcos-convert')))


def test_conversion_covers_the_model(converted_variables):
  state = mmdet_model().state_dict()
  tensors = {k: v for k, v in state.items() if not k.endswith('num_batches_tracked')}
  leaves = jax.tree_util.tree_leaves(converted_variables)
  assert len(leaves) == len(tensors)
  assert sum(int(np.prod(np.shape(x))) for x in leaves) == sum(
      v.numel() for v in tensors.values())
  params = sum(int(np.prod(np.shape(x)))
               for x in jax.tree_util.tree_leaves(converted_variables['params']))
  assert params == 38_567_674


@pytest.mark.parametrize('hw', IMAGES)
def test_converted_detections_equal_mmdet(converted_variables, hw):
  """The converted detector (configs/nas_fcos.py) on mmdetection's input: head outputs within
  CHAIN_RTOL, then the same detections (labels, order), boxes within BOX_ATOL px."""
  from jaxdet.engine import config_cli
  from jaxdet.models.detectors import build_detector
  model = mmdet_model()
  image, _, _, head_out = torch_run(hw)
  meta = dict(img_shape=hw, pad_shape=hw, ori_shape=hw, scale_factor=(1.0, 1.0))
  with torch.no_grad():
    theirs = model.bbox_head.predict_by_feat(*head_out, batch_img_metas=[meta], rescale=False,
                                             with_nms=True)[0]
  config = config_cli.load_config(os.path.join(ROOT, 'configs', 'nas_fcos.py'))
  detector = build_detector(config.model)
  batch = dict(img_shape=np.array([hw], np.int32), scale_factor=np.ones((1, 2), np.float32),
               offset=np.zeros((1, 2), np.float32), flip=np.zeros((1,), bool))
  outputs = detector.module.apply(converted_variables, nchw_to_nhwc(image),
                                  jnp.asarray(batch['img_shape']), train=False)
  for a_levels, b_levels in zip(outputs, (head_out[0], [torch.log(r) for r in head_out[1]],
                                          head_out[2])):
    for a, b in zip(a_levels, b_levels):
      assert rel_diff(a, b.numpy().transpose(0, 2, 3, 1)) < CHAIN_RTOL
  ours = jax.device_get(jax.jit(detector.predict)(outputs, batch))
  valid = np.asarray(ours.valid[0])
  boxes, scores = np.asarray(ours.boxes[0])[valid], np.asarray(ours.scores[0])[valid]
  labels = np.asarray(ours.labels[0])[valid]
  t_boxes, t_scores, t_labels = (theirs.bboxes.numpy(), theirs.scores.numpy(),
                                 theirs.labels.numpy())
  assert len(t_scores) >= 20 and len(scores) == len(t_scores)
  # Detections pair up one to one (same label, score within 1e-4, nearest box); the order is
  # mmdetection's except where two scores tie to float32 round-off (measured: 7e-7 apart).
  pairs = []
  for box, score, label in zip(boxes, scores, labels):
    candidates = np.nonzero((t_labels == label) & (np.abs(t_scores - score) < 1e-4))[0]
    assert len(candidates), (box, score, label)
    pairs.append(candidates[np.argmin(np.abs(t_boxes[candidates] - box).max(1))])
  pairs = np.array(pairs)
  assert sorted(pairs) == list(range(len(t_scores)))
  moved = np.nonzero(pairs != np.arange(len(pairs)))[0]
  assert np.all(np.abs(t_scores[pairs[moved]] - t_scores[moved]) < 1e-5)
  box_diff = float(np.abs(boxes - t_boxes[pairs]).max())
  assert box_diff < BOX_ATOL, box_diff
  np.testing.assert_allclose(scores, t_scores[pairs], atol=1e-5)


# ----------------------------------------------------------------------- optimizer groups

def test_optimizer_groups_equal_mmengine():
  """configs/nas_fcos.py's paramwise rules give every parameter mmengine's lr and decay for
  mmdetection's optim_wrapper (bias_lr_mult 2, bias_decay_mult 0) with full mmcv: the DCNs' own
  biases x2 / no decay, their offset convs' biases x1 / decay, norm biases x1 / no decay, the
  frozen backbone (requires_grad False) skipped."""
  from mmengine.optim.optimizer import default_constructor
  from jaxdet.engine import config_cli
  from jaxdet.engine import optimizer as jd_optimizer
  from jaxdet.models.detectors import build_detector
  from jaxdet.models.registry import BACKBONES
  from jaxdet.models.weights import mmdet_rules
  model = mmdet_model()
  default_constructor.mmcv_full_available = lambda: True  # the DCN offset rule needs it
  constructor = default_constructor.DefaultOptimWrapperConstructor(
      dict(type='OptimWrapper', optimizer=dict(type='SGD', lr=0.01, momentum=0.9,
                                               weight_decay=1e-4)),
      dict(bias_lr_mult=2., bias_decay_mult=0.))
  groups = []
  constructor.add_params(groups, model)
  by_param = {id(g['params'][0]): (g.get('lr', 0.01) / 0.01, g.get('weight_decay', 1e-4) / 1e-4)
              for g in groups}
  # Each tensor as the pair (lr mult, decay mult), 'frozen' = (-1, -1) for the skipped ones.
  lr_state, wd_state = {}, {}
  params = dict(model.named_parameters())
  for name, tensor in model.state_dict().items():
    lr, wd = by_param.get(id(params[name]), (-1., -1.)) if name in params else (0., 0.)
    lr_state[name] = np.full(tensor.shape, lr, np.float32)
    wd_state[name] = np.full(tensor.shape, wd, np.float32)

  config = config_cli.load_config(os.path.join(ROOT, 'configs', 'nas_fcos.py'))
  detector = build_detector(config.model)
  shapes = detector.init_shapes((1, 128, 128, 3))
  target = {'params': shapes['params'], 'batch_stats': shapes.get('batch_stats', {})}
  rules = mmdet_rules(config.model)
  theirs_lr, _ = torch_to_flax(lr_state, rules, target)
  theirs_wd, _ = torch_to_flax(wd_state, rules, target)
  frozen = {'backbone': BACKBONES.get('resnet').frozen(shapes['params']['backbone'],
                                                       config.model.backbone)}
  frozen.update({k: jax.tree_util.tree_map(lambda _: False, v)
                 for k, v in shapes['params'].items() if k != 'backbone'})
  labels = jd_optimizer.param_labels(shapes['params'], frozen, config.optimizer.paramwise)
  mults = dict(jd_optimizer.group_multipliers(config.optimizer.paramwise), frozen=(-1., -1.))
  seen = set()
  for (path, label), lr, wd in zip(jax.tree_util.tree_leaves_with_path(labels),
                                   jax.tree_util.tree_leaves(theirs_lr['params']),
                                   jax.tree_util.tree_leaves(theirs_wd['params'])):
    expected = (float(np.asarray(lr).flat[0]), float(np.asarray(wd).flat[0]))
    assert mults[label] == pytest.approx(expected), (jax.tree_util.keystr(path), label, expected)
    seen.add((label, expected))
  assert {label for label, _ in seen} == {'default', 'bias', 'norm', 'norm_bias', 'dcn_offset',
                                          'frozen'}
