"""Schedules and paramwise optimizer rules, hand-worked (against mmengine: *_mmengine.py)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxdet.engine.optimizer import (build_optimizer, group_multipliers, lr_scaling_line,
                                     param_labels, scaled_lr)
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


def _dcn_params():
  """backbone conv + norm, a head with a DCN (kernel, bias, conv_offset) and a GroupNorm."""
  ones = lambda *s: jnp.ones(s)
  return {'backbone': {'conv': {'kernel': ones(3), 'bias': ones(3)},
                       'bn': {'scale': ones(3), 'bias': ones(3)}},
          'head': {'dcn': {'kernel': ones(3), 'bias': ones(3),
                           'conv_offset': {'kernel': ones(3), 'bias': ones(3)}},
                   'gn': {'scale': ones(3), 'bias': ones(3)},
                   'cls': {'kernel': ones(3), 'bias': ones(3)}}}


def test_custom_keys_longest_then_alphabetical_and_replace_other_rules():
  params = _dcn_params()
  pw = dict(bias_lr_mult=2.0, bias_decay_mult=0.0, norm_decay_mult=0.0,
            custom_keys={'backbone': dict(lr_mult=0.1), 'head': dict(decay_mult=0.5),
                         'head.cls': dict(lr_mult=3.0), 'bias': dict(lr_mult=7.0)})
  labels = param_labels(params, None, pw)
  # 'head.cls' (8 chars) beats 'backbone' (8, but no match) and 'head' (4); among 4-char keys
  # 'bias' < 'head' alphabetically, so head biases take 'bias'.
  assert labels['head']['cls'] == {'kernel': 'custom:head/cls', 'bias': 'custom:head/cls'}
  assert labels['head']['gn'] == {'scale': 'custom:head', 'bias': 'custom:bias'}
  assert labels['head']['dcn']['conv_offset'] == {'kernel': 'custom:head', 'bias': 'custom:bias'}
  assert labels['backbone']['bn'] == {'scale': 'custom:backbone', 'bias': 'custom:backbone'}
  mults = group_multipliers(pw)
  assert mults['custom:backbone'] == (0.1, 1.0)
  assert mults['custom:head'] == (1.0, 0.5)
  assert mults['custom:head/cls'] == (3.0, 1.0)


def test_dcn_offset_and_norm_bias_rules():
  params = _dcn_params()
  pw = dict(bias_lr_mult=2.0, bias_decay_mult=0.0, dcn_offset_lr_mult=0.1)  # no norm_decay_mult
  labels = param_labels(params, None, pw)
  assert labels['head']['dcn'] == {'kernel': 'default', 'bias': 'bias',
                                   'conv_offset': {'kernel': 'dcn_offset', 'bias': 'dcn_offset'}}
  # mmengine: without norm_decay_mult a norm bias takes bias_decay_mult (but not bias_lr_mult).
  assert labels['head']['gn'] == {'scale': 'norm', 'bias': 'norm_bias'}
  mults = group_multipliers(pw)
  assert mults['norm'] == (1.0, 1.0) and mults['norm_bias'] == (1.0, 0.0)
  assert mults['dcn_offset'] == (0.1, 1.0) and mults['bias'] == (2.0, 0.0)
  # A 'conv_offset' that is not inside a module with a kernel is a plain conv.
  plain = param_labels({'conv_offset': {'kernel': jnp.ones(3), 'bias': jnp.ones(3)}}, None, pw)
  assert plain == {'conv_offset': {'kernel': 'default', 'bias': 'bias'}}


def test_bad_paramwise_keys_are_one_line_errors():
  params = _dcn_params()
  with pytest.raises(ValueError, match='optimizer.paramwise.flat_decay_mult'):
    param_labels(params, None, dict(flat_decay_mult=0.0))
  with pytest.raises(ValueError, match='custom_keys.backbone.momentum'):
    param_labels(params, None, dict(custom_keys={'backbone': dict(momentum=0.5)}))
  with pytest.raises(ValueError, match="optimizer.name='adam'"):
    build_optimizer(ml_collections.ConfigDict(dict(name='adam')), lambda s: 0.1, params)


def _step_updates(opt, params, grads_per_step, lr=0.01, frozen=None):
  tx = build_optimizer(ml_collections.ConfigDict(opt), lambda step: lr, params, frozen)
  state = tx.init(params)
  for grads in grads_per_step:
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params


def test_sgd_custom_keys_two_steps_match_hand_computation():
  """p1 = p0 - lr_g (g1 + wd_g p0); p2 = p1 - lr_g (0.9 (g1 + wd_g p0) + g2 + wd_g p1)."""
  params = _dcn_params()
  pw = dict(bias_lr_mult=2.0, bias_decay_mult=0.0, norm_decay_mult=0.0, dcn_offset_lr_mult=0.5,
            custom_keys={'backbone': dict(lr_mult=0.1, decay_mult=3.0)})
  g1 = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.5), params)
  g2 = jax.tree_util.tree_map(lambda p: jnp.full_like(p, -0.25), params)
  lr, wd = 0.01, 0.1
  out = _step_updates(dict(name='sgd', momentum=0.9, weight_decay=wd, paramwise=pw), params,
                      [g1, g2], lr)
  mults = group_multipliers(pw)
  labels = param_labels(params, None, pw)
  for p, label in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(labels)):
    lr_g, wd_g = lr * mults[label][0], wd * mults[label][1]
    b1 = 0.5 + wd_g * 1.0
    p1 = 1.0 - lr_g * b1
    p2 = p1 - lr_g * (0.9 * b1 - 0.25 + wd_g * p1)
    np.testing.assert_allclose(np.asarray(p), p2, rtol=1e-6, err_msg=label)


def test_adamw_two_steps_match_hand_computation():
  """torch.optim.AdamW's update written out: decoupled decay, bias-corrected moments."""
  params = _dcn_params()
  frozen = jax.tree_util.tree_map(lambda _: False, params)
  frozen['backbone']['conv']['kernel'] = True
  pw = dict(bias_decay_mult=0.0, custom_keys={'backbone': dict(lr_mult=0.1)})
  rng = np.random.default_rng(0)
  grads = [jax.tree_util.tree_map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32),
                                  params) for _ in range(2)]
  lr, wd, b1, b2, eps = 1e-3, 0.05, 0.8, 0.95, 1e-3
  out = _step_updates(dict(name='adamw', betas=(b1, b2), eps=eps, weight_decay=wd, paramwise=pw),
                      params, grads, lr, frozen)
  mults = group_multipliers(pw)
  labels = param_labels(params, frozen, pw)
  leaves = lambda t: jax.tree_util.tree_leaves(t)
  for i, (p_out, label) in enumerate(zip(leaves(out), leaves(labels))):
    if label == 'frozen':
      np.testing.assert_array_equal(np.asarray(p_out), 1.0)
      continue
    lr_g, wd_g = lr * mults[label][0], wd * mults[label][1]
    p, m, v = np.ones(3), np.zeros(3), np.zeros(3)
    for t, g in enumerate((np.asarray(leaves(grads[0])[i]), np.asarray(leaves(grads[1])[i])), 1):
      p = p * (1 - lr_g * wd_g)
      m = b1 * m + (1 - b1) * g
      v = b2 * v + (1 - b2) * g * g
      p = p - lr_g * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    np.testing.assert_allclose(np.asarray(p_out), p, rtol=1e-6, err_msg=label)


def test_config_bases_build_the_optimizer_with_custom_keys():
  from configs._base_ import optimizer as optimizer_base
  params = _dcn_params()
  grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.5), params)
  sgd = optimizer_base.sgd(base_lr=0.02, weight_decay=0.1)
  assert (sgd.name, sgd.momentum, sgd.base_batch, dict(sgd.paramwise.custom_keys)) == (
      'sgd', 0.9, 16, {})
  sgd.paramwise.custom_keys['backbone'] = dict(lr_mult=0.1)
  out = _step_updates(sgd, params, [grads], lr=0.02)
  np.testing.assert_allclose(out['backbone']['bn']['bias'], 1 - 0.002 * (0.5 + 0.1), rtol=1e-6)
  np.testing.assert_allclose(out['head']['cls']['bias'], 1 - 0.02 * (0.5 + 0.1), rtol=1e-6)
  adamw = optimizer_base.adamw(base_lr=1e-4, weight_decay=0.5, betas=(0.9, 0.99))
  assert (adamw.name, adamw.betas, adamw.eps) == ('adamw', (0.9, 0.99), 1e-8)
  out = _step_updates(adamw, params, [grads], lr=1e-4)
  # First AdamW step: p - lr * (g / (|g| + eps) + wd * p).
  np.testing.assert_allclose(out['head']['cls']['kernel'], 1 - 1e-4 * (0.5 / (0.5 + 1e-8) + 0.5),
                             rtol=1e-6)
