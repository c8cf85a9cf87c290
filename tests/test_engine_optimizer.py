"""Schedules and paramwise optimizer rules: hand-worked values here; torch/mmengine in the torch file."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxdet.engine.optimizer import build_optimizer, lr_scaling_line, param_labels, scaled_lr
from jaxdet.engine.schedules import build_schedule


def _schedule_config(**kw):
  c = dict(epochs=12, warmup='linear', warmup_iters=500, warmup_ratio=0.001, policy='step',
           milestones=(8, 11), gamma=0.1)
  c.update(kw)
  return ml_collections.ConfigDict(c)


def test_linear_scaling_rule_examples():
  # mmdetection's classic examples for a base_lr of 0.02 at 16 images.
  assert scaled_lr(0.02, 8 * 2) == pytest.approx(0.02)
  assert scaled_lr(0.02, 4 * 2) == pytest.approx(0.01)
  assert scaled_lr(0.02, 2 * 2) == pytest.approx(0.005)
  assert scaled_lr(0.02, 4 * 1) == pytest.approx(0.005)
  assert lr_scaling_line(0.01, 0.005, 4, 2, 16) == (
      'global batch 8 = 4 devices x 2 images; lr 0.005 = base_lr 0.01 x 8 / 16 (base batch)')


def test_linear_warmup_and_step_decay_hand_values():
  sched = build_schedule(0.01, _schedule_config(), steps_per_epoch=100)
  # mmengine LinearLR: factor = 0.001 + 0.999 * step / 499 up to step 499.
  for step in (0, 1, 250, 498):
    assert float(sched(step)) == pytest.approx(0.01 * (0.001 + 0.999 * step / 499), rel=1e-5)
  assert float(sched(499)) == pytest.approx(0.01)
  assert float(sched(799)) == pytest.approx(0.01)       # epoch 7
  assert float(sched(800)) == pytest.approx(0.001)      # epoch 8: x0.1
  assert float(sched(1099)) == pytest.approx(0.001)
  assert float(sched(1100)) == pytest.approx(0.0001)    # epoch 11: x0.01


def test_constant_warmup_and_cosine():
  sched = build_schedule(0.01, _schedule_config(warmup='constant', warmup_ratio=1 / 3),
                         steps_per_epoch=1000)
  assert float(sched(0)) == pytest.approx(0.01 / 3)
  assert float(sched(498)) == pytest.approx(0.01 / 3)
  assert float(sched(499)) == pytest.approx(0.01)
  cos = build_schedule(1.0, _schedule_config(warmup=None, policy='cosine'), steps_per_epoch=10)
  assert float(cos(0)) == pytest.approx(1.0)
  assert float(cos(119)) == pytest.approx(0.0, abs=1e-6)
  assert float(cos(119 / 2)) == pytest.approx(0.5, abs=1e-6)
  with pytest.raises(ValueError, match="warmup='cubic'"):
    build_schedule(1.0, _schedule_config(warmup='cubic'), steps_per_epoch=10)(0)


def _toy_params():
  return {'conv': {'kernel': jnp.ones((3,)), 'bias': jnp.ones((3,))},
          'gn': {'scale': jnp.ones((3,)), 'bias': jnp.ones((3,))},
          'scales_0': {'scale': jnp.ones(())},
          'stem': {'kernel': jnp.ones((3,))}}


def test_param_labels_follow_mmengine_rules():
  params = _toy_params()
  frozen = jax.tree_util.tree_map(lambda _: False, params)
  frozen['stem']['kernel'] = True
  labels = param_labels(params, frozen)
  assert labels == {'conv': {'kernel': 'default', 'bias': 'bias'},
                    'gn': {'scale': 'norm', 'bias': 'norm'},
                    'scales_0': {'scale': 'default'},
                    'stem': {'kernel': 'frozen'}}


def test_sgd_step_matches_hand_computation():
  """One SGD step from zero momentum: p - lr_g * (g + wd_g * p) per group."""
  params = _toy_params()
  frozen = jax.tree_util.tree_map(lambda _: False, params)
  frozen['stem']['kernel'] = True
  grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.5), params)
  opt = ml_collections.ConfigDict(dict(name='sgd', momentum=0.9, weight_decay=0.1, grad_clip=None,
                                       paramwise=dict(bias_lr_mult=2.0, bias_decay_mult=0.0,
                                                      norm_decay_mult=0.0)))
  lr = 0.01
  tx = build_optimizer(opt, lambda step: lr, params, frozen)
  updates, _ = tx.update(grads, tx.init(params), params)
  expect = {'default': -lr * (0.5 + 0.1), 'bias': -2 * lr * 0.5, 'norm': -lr * 0.5, 'frozen': 0.0}
  labels = param_labels(params, frozen)
  for u, g in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(labels)):
    np.testing.assert_allclose(np.asarray(u), expect[g], rtol=1e-6)


def test_grad_clip_scales_global_norm():
  params = {'w': {'kernel': jnp.zeros((4,))}}
  grads = {'w': {'kernel': jnp.full((4,), 10.0)}}  # norm 20
  opt = ml_collections.ConfigDict(dict(name='sgd', momentum=0.0, weight_decay=0.0, grad_clip=5.0))
  tx = build_optimizer(opt, lambda step: 1.0, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(np.asarray(updates['w']['kernel']), -2.5, rtol=1e-6)
