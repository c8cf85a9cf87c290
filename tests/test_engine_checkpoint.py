"""Checkpointer: bit-exact round trips of a train state with optax state, keep-N, atomicity,
params-only loading, and the SIGTERM/SIGINT stop request."""
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdet.engine.checkpoint import Checkpointer
from jaxdet.engine.checkpoint import install_signal_handlers
from jaxdet.engine.checkpoint import load_params


def _params(seed):
  rng = np.random.default_rng(seed)
  return {
      'backbone': {'conv1': {'kernel': rng.normal(size=(3, 3, 3, 4)).astype(np.float32)},
                   'bn1': {'scale': rng.normal(size=(4,)).astype(np.float32),
                           'bias': rng.normal(size=(4,)).astype(np.float32)}},
      'head': {'cls': {'kernel': rng.normal(size=(1, 1, 4, 2)).astype(np.float32),
                       'bias': np.full((2,), -4.59, np.float32)}},
  }


def _state(seed):
  """A train state as train.py keeps it: params, BN statistics, SGD-momentum state, step, rng."""
  params = jax.tree.map(jnp.asarray, _params(seed))
  tx = optax.chain(optax.clip_by_global_norm(35.0), optax.sgd(0.01, momentum=0.9))
  opt_state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5 + seed), params)
  _, opt_state = tx.update(grads, opt_state, params)   # non-zero momentum traces
  return dict(
      params=params,
      batch_stats={'backbone': {'bn1': {'mean': jnp.arange(4.0) + seed, 'var': jnp.ones(4)}}},
      opt_state=opt_state,
      step=jnp.asarray(100 * seed, jnp.int32),
      rng=jax.random.key_data(jax.random.PRNGKey(seed)),
  )


def _assert_bitwise_equal(a, b):
  leaves_a, tree_a = jax.tree_util.tree_flatten(a)
  leaves_b, tree_b = jax.tree_util.tree_flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


def test_round_trip_bitwise(tmp_path):
  state = _state(1)
  data_state = {'version': 1, 'next_batch': np.int64(37), 'seed': 0, 'batches_per_epoch': 12}
  with Checkpointer(tmp_path / 'ckpt', max_to_keep=3) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(100, state, data_state=data_state, extra={'epoch': 3})
    assert ckpt.latest_step() == 100
    assert not ckpt.save(100, state, data_state=data_state)   # already there: nothing written
    ckpt.wait()

  # A fresh Checkpointer (a new process) restores into the abstract structure.
  abstract = jax.eval_shape(lambda: _state(0))
  with Checkpointer(tmp_path / 'ckpt', max_to_keep=3) as ckpt:
    restored, restored_data, extra = ckpt.restore(abstract)
  _assert_bitwise_equal(restored, state)
  # optax's NamedTuples and empty states come back as such.
  assert type(restored['opt_state']) is type(state['opt_state'])
  assert type(restored['opt_state'][1][0]).__name__ == 'TraceState'
  assert restored_data == {'version': 1, 'next_batch': 37, 'seed': 0, 'batches_per_epoch': 12}
  assert extra == {'epoch': 3}
  device = jax.local_devices()[0]
  for leaf in jax.tree.leaves(restored):
    assert isinstance(leaf, jax.Array) and leaf.devices() == {device}


def test_restore_from_numpy_state_and_typed_key(tmp_path):
  """Host (numpy) leaves and new-style typed PRNG keys round-trip too."""
  state = {'params': _params(2), 'step': np.int32(5), 'key': jax.random.key(7)}
  with Checkpointer(tmp_path, max_to_keep=1) as ckpt:
    ckpt.save(5, state, data_state={})
    restored, data_state, extra = ckpt.restore(jax.eval_shape(lambda: state))
  assert data_state == {} and extra == {}
  _assert_bitwise_equal(restored['params'], state['params'])
  assert int(restored['step']) == 5
  np.testing.assert_array_equal(jax.random.key_data(restored['key']),
                                jax.random.key_data(state['key']))
  np.testing.assert_array_equal(jax.random.uniform(restored['key'], (3,)),
                                jax.random.uniform(state['key'], (3,)))


def test_keeps_last_n_and_restores_any_kept_step(tmp_path):
  abstract = jax.eval_shape(lambda: _state(0))
  with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
    for seed in (1, 2, 3, 4):
      ckpt.save(seed * 10, _state(seed), data_state={'next_batch': seed})
    assert ckpt.all_steps() == [30, 40]
    assert ckpt.latest_step() == 40
    assert sorted(os.listdir(tmp_path)) == ['30', '40']
    state, data_state, _ = ckpt.restore(abstract, step=30)
    _assert_bitwise_equal(state, _state(3))
    assert data_state == {'next_batch': 3}
    with pytest.raises(ValueError, match='no checkpoint for step 10'):
      ckpt.restore(abstract, step=10)


def test_partial_save_is_never_latest(tmp_path):
  """A save killed before its rename leaves `<step>.orbax-checkpoint-tmp-*`; a folder without
  orbax's commit marker is not a checkpoint either. Neither is listed, restored, or kept."""
  abstract = jax.eval_shape(lambda: _state(0))
  with Checkpointer(tmp_path, max_to_keep=3) as ckpt:
    ckpt.save(10, _state(1), data_state={'next_batch': 1})
  # A killed save of step 20: everything written but the final rename.
  shutil.copytree(tmp_path / '10', tmp_path / '20.orbax-checkpoint-tmp-1700000000')
  os.remove(tmp_path / '20.orbax-checkpoint-tmp-1700000000' / 'commit_success.txt')
  # A step folder that was never committed (e.g. a copy cut short).
  shutil.copytree(tmp_path / '10', tmp_path / '30')
  os.remove(tmp_path / '30' / 'commit_success.txt')
  shutil.rmtree(tmp_path / '30' / 'state')

  with Checkpointer(tmp_path, max_to_keep=3) as ckpt:
    assert ckpt.latest_step() == 10
    assert ckpt.all_steps() == [10]
    state, data_state, _ = ckpt.restore(abstract)
    _assert_bitwise_equal(state, _state(1))
    assert data_state == {'next_batch': 1}
    # The leftover tmp folder was cleaned up when the Checkpointer opened.
    assert not any('orbax-checkpoint-tmp' in name for name in os.listdir(tmp_path))
    # Saving the interrupted step again works.
    ckpt.save(20, _state(2), data_state={'next_batch': 2})
    assert ckpt.latest_step() == 20
    _assert_bitwise_equal(ckpt.restore(abstract)[0], _state(2))
  assert load_params(tmp_path)['params']['head']['cls']['bias'].shape == (2,)


def test_load_params_without_optimizer_structure(tmp_path):
  with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
    ckpt.save(1, _state(1), data_state={})
    ckpt.save(2, _state(2), data_state={})
  loaded = load_params(tmp_path)
  assert sorted(loaded) == ['batch_stats', 'params']
  _assert_bitwise_equal(loaded['params'], _state(2)['params'])
  _assert_bitwise_equal(loaded['batch_stats'], _state(2)['batch_stats'])
  _assert_bitwise_equal(load_params(tmp_path, step=1)['params'], _state(1)['params'])
  with pytest.raises(FileNotFoundError):
    load_params(tmp_path / 'missing')
  with pytest.raises(ValueError, match='no checkpoint for step 5'):
    load_params(tmp_path, step=5)


def test_bad_inputs(tmp_path):
  with pytest.raises(ValueError, match='max_to_keep'):
    Checkpointer(tmp_path, max_to_keep=0)
  with Checkpointer(tmp_path, max_to_keep=1) as ckpt:
    with pytest.raises(FileNotFoundError, match='no checkpoint'):
      ckpt.restore({'x': jax.ShapeDtypeStruct((2,), jnp.float32)})
    with pytest.raises(ValueError, match='data_state must be JSON-able'):
      ckpt.save(1, {'x': np.zeros(2)}, data_state={'f': object()})
    assert ckpt.latest_step() is None


def test_stop_request_on_sigterm_and_second_sigint_interrupts():
  # Start from Python's own Ctrl-C handler, whatever an earlier test or library left installed.
  outer_int = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    _check_stop_request_then_second_sigint_interrupts()
  finally:
    signal.signal(signal.SIGINT, outer_int)


def _check_stop_request_then_second_sigint_interrupts():
  previous_int = signal.getsignal(signal.SIGINT)
  previous_term = signal.getsignal(signal.SIGTERM)
  stop = install_signal_handlers()
  try:
    assert not stop.requested
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested and stop.signal == 'SIGTERM'
    # The first signal put the previous handlers back: Ctrl-C interrupts as usual.
    assert signal.getsignal(signal.SIGTERM) is previous_term
    assert signal.getsignal(signal.SIGINT) is previous_int
  finally:
    stop.uninstall()

  with install_signal_handlers() as stop:
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.requested and stop.signal == 'SIGINT'
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is previous_int
