"""NAS-FCOS modules: parameter counts (REFERENCE.md), the FPN's resizing rules and BatchNorm on
hand-worked / numpy references, and the head's outputs through the shared FCOS loss."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxdet.models.backbones.resnet import ResNet
from jaxdet.models.heads.fcos_head import fcos_loss
from jaxdet.models.heads.nasfcos_head import NASFCOSHead
from jaxdet.models.necks import nasfcos_fpn
from jaxdet.models.necks.nasfcos_fpn import NASFCOS_FPN, BatchNorm


def _count(module, *args):
  shapes = jax.eval_shape(module.init, jax.random.key(0), *args)
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes['params']))


def _maps(channels, size):
  return tuple(jax.ShapeDtypeStruct((1, size // 2 ** i, size // 2 ** i, c), jnp.float32)
               for i, c in enumerate(channels))


def test_param_counts_equal_mmdetection():
  """NAS-FCOS R50-caffe: 38,567,674 = backbone 23,508,032 + neck 10,690,696 + head 4,368,946."""
  backbone = _count(ResNet(depth=50, style='caffe', bn_eps=0.0),
                    jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  neck = _count(NASFCOS_FPN(), _maps((256, 512, 1024, 2048), 128))
  head = _count(NASFCOSHead(num_classes=80), _maps((256,) * 5, 64))
  assert (backbone, neck, head) == (23_508_032, 10_690_696, 4_368_946)
  assert backbone + neck + head == 38_567_674


def test_resize_nearest_hand_worked():
  x = jnp.arange(3.)[None, :, None, None] * jnp.ones((1, 1, 2, 1))
  # torch: src = floor(dst * 3 / 7) -> 0 0 0 1 1 2 2; doubling: dst >> 1
  assert nasfcos_fpn.resize_nearest(x, (7, 2))[0, :, 0, 0].tolist() == [0, 0, 0, 1, 1, 2, 2]
  assert nasfcos_fpn.resize_nearest(x, (6, 2))[0, :, 0, 0].tolist() == [0, 0, 1, 1, 2, 2]


def test_resize_bilinear_hand_worked():
  x = jnp.array([0., 10., 20., 30.])[None, :, None, None]
  # align_corners=False: src = (dst + 0.5) * in / out - 0.5, clamped at 0 and at the last row.
  up = nasfcos_fpn.resize_bilinear(x, (8, 1))[0, :, 0, 0]
  np.testing.assert_allclose(up, [0, 2.5, 7.5, 12.5, 17.5, 22.5, 27.5, 30], atol=1e-6)
  down = nasfcos_fpn.resize_bilinear(x, (2, 1))[0, :, 0, 0]  # src 0.5, 2.5
  np.testing.assert_allclose(down, [5, 25], atol=1e-6)
  odd = nasfcos_fpn.resize_bilinear(x, (3, 1))[0, :, 0, 0]  # src 1/6, 1.5, 17/6
  np.testing.assert_allclose(odd, [10 / 6, 15, 170 / 6], rtol=1e-6)
  two_d = nasfcos_fpn.resize_bilinear(jnp.array([[0., 1.], [2., 3.]])[None, ..., None], (1, 1))
  np.testing.assert_allclose(two_d[0, 0, 0, 0], 1.5)


def test_merge_cell_resize_rules():
  x = jnp.arange(36.).reshape(1, 6, 6, 1)
  assert nasfcos_fpn.resize_like_merge_cell(x, (6, 6)) is x
  assert nasfcos_fpn.resize_like_merge_cell(x, (12, 12)).shape == (1, 12, 12, 1)
  # larger -> max pool by the ratio
  pooled = nasfcos_fpn.resize_like_merge_cell(x, (3, 3))[0, ..., 0]
  np.testing.assert_array_equal(pooled, np.arange(36.).reshape(6, 6)[1::2, 1::2])
  # not a multiple: zero padding split (floor before, rest after), then pooling: 6 -> 8 -> 4
  padded = nasfcos_fpn.resize_like_merge_cell(-1 - x, (4, 4))[0, ..., 0]
  assert padded[0, 0] == 0 and padded[3, 3] == 0 and padded[1, 1] == -1 - 7
  # torch.Size compares lexicographically: (5, 20) < (6, 2), so it is "upsampled" (nearest)
  assert nasfcos_fpn.resize_like_merge_cell(jnp.ones((1, 5, 20, 1)), (6, 2)).shape == (1, 6, 2, 1)


def test_batchnorm_train_and_eval():
  rng = np.random.default_rng(0)
  x = rng.normal(2, 3, (2, 3, 4, 5)).astype(np.float32)
  bn = BatchNorm(momentum=0.1, epsilon=1e-5)
  variables = bn.init(jax.random.key(0), x)
  variables = {'params': {'scale': jnp.arange(1., 6.), 'bias': jnp.ones(5)},
               'batch_stats': variables['batch_stats']}
  y, mutated = bn.apply(variables, x, train=True, mutable=['batch_stats'])
  flat = x.reshape(-1, 5).astype(np.float64)
  mean, var = flat.mean(0), flat.var(0)
  np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5) * np.arange(1, 6) + 1,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(mutated['batch_stats']['mean'], 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(mutated['batch_stats']['var'], 0.9 + 0.1 * flat.var(0, ddof=1),
                             rtol=1e-5)
  stats = {'mean': jnp.full(5, 1.), 'var': jnp.full(5, 4.)}
  y_eval = bn.apply({'params': variables['params'], 'batch_stats': stats}, x)
  np.testing.assert_allclose(y_eval, (x - 1) / np.sqrt(4 + 1e-5) * np.arange(1, 6) + 1,
                             rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_neck_shapes_and_head_through_fcos_loss():
  """A small NAS-FCOS (the smoke's sizes) on a 64x96 batch: P3..P5 at the backbone's sizes, the
  head's outputs in the layout fcos_loss takes, finite losses and gradients (DCNs included),
  running statistics updated in training."""
  images = jax.random.normal(jax.random.key(1), (2, 64, 96, 3))
  backbone = ResNet(depth=18, base_width=8, frozen_stages=-1, norm_eval=False)
  neck = NASFCOS_FPN(out_channels=32, num_outs=3)
  head = NASFCOSHead(num_classes=3, num_levels=3, feat_channels=32, gn_groups=8)
  feats = backbone.apply(backbone.init(jax.random.key(0), images), images)
  neck_vars = neck.init(jax.random.key(2), feats)
  pyramid = neck.apply(neck_vars, feats)
  assert [p.shape for p in pyramid] == [(2, 8, 12, 32), (2, 4, 6, 32), (2, 2, 3, 32)]
  head_vars = head.init(jax.random.key(3), pyramid)
  cfg = ml_collections.ConfigDict(dict(
      strides=(8, 16, 32), regress_ranges=((-1, 16), (16, 32), (32, 1e8)), focal_alpha=0.25,
      focal_gamma=2.0, loss_cls_weight=1.0, loss_bbox_weight=1.0, loss_centerness_weight=1.0,
      center_sampling=False, center_sample_radius=1.5, norm_on_bbox=False))
  batch = dict(gt_boxes=jnp.array([[[4., 4., 40., 30.], [0, 0, 0, 0]],
                                   [[30., 10., 90., 60.], [2., 2., 14., 12.]]]),
               gt_labels=jnp.array([[1, 0], [2, 0]]), gt_mask=jnp.array([[True, False],
                                                                          [True, True]]))

  def loss_fn(params):
    pyr, mutated = neck.apply({'params': params['neck'], 'batch_stats': neck_vars['batch_stats']},
                              feats, train=True, mutable=['batch_stats'])
    outputs = head.apply({'params': params['head']}, pyr, train=True)
    losses = fcos_loss(outputs, batch, cfg)
    return losses['loss_cls'] + losses['loss_bbox'] + losses['loss_centerness'], (losses, mutated)

  params = {'neck': neck_vars['params'], 'head': head_vars['params']}
  (total, (losses, mutated)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  assert np.isfinite(float(total)) and float(losses['num_pos']) > 0
  leaves = jax.tree_util.tree_leaves(grads)
  assert all(bool(jnp.isfinite(g).all()) for g in leaves)
  # the DCN offset convs start at zero but receive gradient
  offset_grad = grads['head']['cls_convs_0']['conv_offset']['kernel']
  assert float(jnp.abs(offset_grad).max()) > 0
  old = neck_vars['batch_stats']['adapt_convs_0']['bn']['mean']
  assert not np.allclose(mutated['batch_stats']['adapt_convs_0']['bn']['mean'], old)


def test_grouped_deform_conv_equals_separate_layers():
  """Three DCNs (one input shared by two) in one grouped call = each as mmcv's
  `ModulatedDeformConv2dPack` (jaxdet.models.layers.deform_conv) with the same parameters."""
  from jaxdet.models.layers.deform_conv import ModulatedDeformConv2dPack
  from jaxdet.models.layers.deform_conv_group import DeformConvWeights, grouped_deform_conv

  class Three(nn.Module):
    @nn.compact
    def __call__(self, xs):
      layers = [DeformConvWeights(6, 4, 3, 2, name=f'd{i}') for i in range(3)]
      return grouped_deform_conv(layers, xs)

  keys = jax.random.split(jax.random.key(0), 8)
  a, b = (jax.random.normal(k, (2, 7, 9, 4)) for k in keys[:2])
  xs = (a, a, b)
  variables = Three().init(keys[2], xs)
  # non-zero offsets: random offset convs
  params = jax.tree_util.tree_map(lambda p: p, variables['params'])
  for i in range(3):
    conv = params[f'd{i}']['conv_offset']
    conv['kernel'] = 0.3 * jax.random.normal(keys[3 + i], conv['kernel'].shape)
    conv['bias'] = jax.random.normal(keys[6], conv['bias'].shape)
    params[f'd{i}']['bias'] = jnp.arange(6.) * (i + 1)
  ours = Three().apply({'params': params}, xs)
  single = ModulatedDeformConv2dPack(6, 3, padding=1, deform_groups=2)
  for i, x in enumerate(xs):
    ref = single.apply({'params': params[f'd{i}']}, x)
    np.testing.assert_allclose(ours[i], ref, rtol=1e-5, atol=1e-5)


def test_pairwise_conv_equals_grouped_conv():
  """The cells' out conv (1x1, groups = features, on 2 x features channels) as an elementwise
  product-sum: same init, outputs and gradients as flax's grouped nn.Conv."""
  features = 6
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7, 2 * features))
  grouped = nn.Conv(features, (1, 1), feature_group_count=features, use_bias=False,
                    kernel_init=nasfcos_fpn.kaiming_fan_out)
  pairwise = nasfcos_fpn.PairwiseConv1x1(features)
  key = jax.random.PRNGKey(1)
  vg, vp = grouped.init(key, x), pairwise.init(key, x)
  np.testing.assert_array_equal(vg['params']['kernel'], vp['params']['kernel'])
  # a different kernel than the init, so that channel order errors show
  kernel = jax.random.normal(jax.random.PRNGKey(2), vg['params']['kernel'].shape)
  v = {'params': {'kernel': kernel}}
  np.testing.assert_allclose(pairwise.apply(v, x), grouped.apply(v, x), rtol=1e-6, atol=1e-6)
  loss = lambda mod: lambda p, x: jnp.sum(jnp.sin(mod.apply({'params': p}, x)))
  gp = jax.grad(loss(pairwise), argnums=(0, 1))(v['params'], x)
  gg = jax.grad(loss(grouped), argnums=(0, 1))(v['params'], x)
  for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gg)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='expected 12 input channels'):
    pairwise.apply(v, x[..., :8])
