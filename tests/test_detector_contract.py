"""The detector contract (jaxdet.models.detectors / registry / heads.head): every registered head
ignores padding images (image_valid False) in its loss, the detector's call takes img_shape and
train, init is one function, the registries name what they have, and the dropout key is a
function of seed, step and device alone."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxdet.engine import config_cli
from jaxdet.engine.steps import dropout_key
from jaxdet.models.detectors import build_detector
from jaxdet.models.registry import BACKBONES, HEADS, NECKS

SIZE = 64
DENSE_CONFIGS = ('atss', 'retinanet', 'fcos')


@functools.lru_cache(maxsize=None)
def smoke_model(name):
  config = config_cli.load_config(f'configs/{name}.py:smoke', [])
  return config, build_detector(config.model)


def scene(rng, num_images, num_classes):
  """A batch of `num_images` real images with 1-3 boxes each (padded to 4 rows)."""
  boxes = np.zeros((num_images, 4, 4), np.float32)
  mask = np.zeros((num_images, 4), bool)
  for i in range(num_images):
    n = rng.integers(1, 4)
    xy = rng.uniform(0, SIZE - 24, (n, 2))
    wh = rng.uniform(8, 24, (n, 2))
    boxes[i, :n] = np.concatenate([xy, xy + wh], 1)
    mask[i, :n] = True
  return dict(gt_boxes=boxes, gt_labels=rng.integers(0, num_classes, (num_images, 4)).astype(
      np.int32), gt_mask=mask, img_shape=np.full((num_images, 2), SIZE, np.int32),
              pad_shape=np.full((num_images, 2), SIZE, np.int32),
              image_valid=np.ones(num_images, bool))


def with_padding_image(batch):
  """The batch plus one evaluation-padding slot: all zero, image_valid False (as the loader)."""
  return {k: np.concatenate([v, np.zeros_like(v[:1])]) for k, v in batch.items()}


@pytest.mark.parametrize('name', DENSE_CONFIGS)
def test_a_padding_image_changes_no_loss(name):
  """Losses of 2 real images == losses of the same 2 plus a padding image whose head outputs are
  random: the padding slot adds no positive, negative or normaliser."""
  config, detector = smoke_model(name)
  rng = np.random.default_rng(0)
  batch = scene(rng, 2, config.model.num_classes)
  variables = detector.init(jax.random.key(0), (1, SIZE, SIZE, 3))
  images = jnp.asarray(rng.normal(size=(3, SIZE, SIZE, 3)), jnp.float32)
  padded = with_padding_image(batch)
  outputs3 = detector.module.apply(variables, images, jnp.asarray(padded['img_shape']))
  outputs2 = jax.tree_util.tree_map(lambda x: x[:2], outputs3)
  got2 = detector.loss(outputs2, batch)
  got3 = detector.loss(outputs3, padded)
  assert float(got2['num_pos']) > 0
  for key in got2:
    np.testing.assert_allclose(float(got3[key]), float(got2[key]), rtol=2e-6, err_msg=key)
  # and the padding slot's outputs do not matter: a different padding output, the same losses
  moved = jax.tree_util.tree_map(lambda x: x.at[2:].add(5.0), outputs3)
  for key, value in detector.loss(moved, padded).items():
    np.testing.assert_allclose(float(value), float(got2[key]), rtol=2e-6, err_msg=key)


def test_detector_call_and_init():
  """`init` is the module's init with zero images; img_shape may be omitted (full images)."""
  _, detector = smoke_model('atss')
  variables = detector.init(jax.random.key(1), (2, SIZE, SIZE, 3))
  direct = detector.module.init(jax.random.key(1), jnp.zeros((2, SIZE, SIZE, 3)),
                                jnp.full((2, 2), SIZE, jnp.int32), train=False)
  jax.tree_util.tree_map(np.testing.assert_array_equal, variables, direct)
  x = jax.random.normal(jax.random.key(2), (2, SIZE, SIZE, 3))
  a = detector.module.apply(variables, x)
  b = detector.module.apply(variables, x, jnp.full((2, 2), SIZE, jnp.int32), train=False)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_registries_name_what_they_have():
  assert {'atss', 'retinanet', 'fcos'} <= set(HEADS.names())
  assert 'resnet' in BACKBONES and 'fpn' in NECKS
  cfg = ml_collections.ConfigDict(dict(type='nope'))
  with pytest.raises(ValueError, match=r"model.backbone.type='nope' must be one of \["):
    BACKBONES.get(cfg.type)
  config, _ = smoke_model('atss')
  config = config.copy_and_resolve_references()
  config.model.type = 'yolo'
  with pytest.raises(ValueError, match=r"model.type='yolo' must be one of \['atss'"):
    build_detector(config.model)
  with pytest.raises(ValueError, match='registered twice'):
    HEADS.register('atss', HEADS.get('atss'))


def test_dropout_key_depends_on_seed_step_and_device_only():
  """Two devices get different keys; the same (seed, step, device) gives the same key in any
  program; another step or seed another key."""
  keys = jax.pmap(lambda s: jax.random.key_data(dropout_key(0, s)), axis_name='batch')
  n = jax.local_device_count()
  k5 = np.asarray(keys(jnp.full((n,), 5)))
  again = np.asarray(keys(jnp.full((n,), 5)))
  np.testing.assert_array_equal(k5, again)
  expected = jax.random.key_data(
      jax.random.fold_in(jax.random.fold_in(jax.random.key(0, impl='rbg'), 5), 0))
  np.testing.assert_array_equal(k5[0], np.asarray(expected))
  assert not np.array_equal(np.asarray(keys(jnp.full((n,), 6)))[0], k5[0])
  other_seed = jax.pmap(lambda s: jax.random.key_data(dropout_key(1, s)), axis_name='batch')
  assert not np.array_equal(np.asarray(other_seed(jnp.full((n,), 5)))[0], k5[0])
