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
