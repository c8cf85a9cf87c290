"""Parameter counts of the full-size modules equal mmdetection's (REFERENCE.md), by shape-only init."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdet.models.backbones import ResNet
from jaxdet.models.heads import DenseHead
from jaxdet.models.necks import FPN


def _count(module, *args):
  shapes = jax.eval_shape(module.init, jax.random.key(0), *args)
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes['params']))


def _feats(channels, size=64):
  return tuple(jax.ShapeDtypeStruct((1, size // 2 ** i, size // 2 ** i, c), jnp.float32)
               for i, c in enumerate(channels))


@pytest.mark.parametrize('depth,expected', [(50, 23_508_032), (101, 42_500_160)])
def test_resnet_param_count(depth, expected):
  image = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  assert _count(ResNet(depth=depth), image) == expected


@pytest.mark.parametrize('extra,expected', [('on_output', 3_868_672), ('on_input', 7_997_440)])
def test_fpn_param_count(extra, expected):
  assert _count(FPN(add_extra_convs=extra), _feats((256, 512, 1024, 2048), 128)) == expected


@pytest.mark.parametrize('kwargs,expected', [
    (dict(num_anchors=1, norm='gn', centerness='reg'), 4_918_618),    # ATSS
    (dict(num_anchors=1, norm='gn', centerness='cls'), 4_918_618),    # FCOS
    (dict(num_anchors=9, norm=None, centerness=None, use_scale=False), 6_463_220),  # RetinaNet
])
def test_dense_head_param_count(kwargs, expected):
  assert _count(DenseHead(num_classes=80, **kwargs), _feats((256,) * 5, 64)) == expected


_ATSS_R50 = dict(total=32_295_322, backbone=23_508_032, neck=3_868_672, head=4_918_618)


@pytest.mark.parametrize('spec,expected', [
    ('atss.py', _ATSS_R50),
    ('atss_r101.py', dict(_ATSS_R50, total=51_287_450, backbone=42_500_160)),
    ('retinanet.py', dict(total=37_968_692, backbone=23_508_032, neck=7_997_440,
                          head=6_463_220)),
    # fcos_r50-caffe_fpn_gn-head (1x, ms-640-800-2x): caffe R50 (its frozen BN scales / biases
    # still counted), FPN P3-P7 on outputs, GN head with centerness off the cls tower
    ('fcos.py', _ATSS_R50),
    ('fcos_mstrain.py', _ATSS_R50),
])
def test_full_config_param_count(spec, expected):
  """The whole detector of a config equals mmdetection's (`jaxdet.info`'s count, shape-only)."""
  import os
  from jaxdet import info
  from jaxdet.engine import config_cli
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = config_cli.load_config(os.path.join(root, 'configs', spec))
  assert info.count_params(config) == expected
