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


# ------------------------------------------------------------------ async saves, cadence, position

def test_async_save_returns_with_a_host_copy_and_waits_before_the_next(tmp_path):
  """`save` returns before the write is done, with its own host copy of the state: deleting the
  caller's device buffers right away (as a donated train step does) changes nothing written."""
  state = _state(3)
  expected = jax.device_get(state)
  with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
    assert ckpt.async_save
    assert ckpt.save(300, state, data_state={'next_batch': 3}, extra={'epoch': 1})
    for leaf in jax.tree.leaves(state):
      leaf.delete()                       # the caller's buffers are gone
    assert ckpt.save(400, _state(4), data_state={'next_batch': 4})  # waits for step 300 first
    assert ckpt.all_steps() == [300, 400]   # (waits for step 400)
    assert not ckpt.saving()
    restored, data_state, extra = ckpt.restore(jax.eval_shape(lambda: _state(0)), step=300)
  _assert_bitwise_equal(restored, expected)
  assert data_state == {'next_batch': 3} and extra == {'epoch': 1}


def test_a_killed_save_is_logged_and_deleted_on_open(tmp_path, caplog):
  """orbax 0.12 names a folder being written `<step>.orbax-checkpoint-tmp[-<time>]`; opening the
  directory again logs each such leftover (and an uncommitted step folder) once, deletes the tmp
  folders and resumes from the last complete step."""
  with Checkpointer(tmp_path, max_to_keep=3) as ckpt:
    ckpt.save(10, _state(1), data_state={'next_batch': 1})
  shutil.copytree(tmp_path / '10', tmp_path / '20.orbax-checkpoint-tmp')
  os.remove(tmp_path / '20.orbax-checkpoint-tmp' / 'commit_success.txt')
  shutil.copytree(tmp_path / '10', tmp_path / '30')
  os.remove(tmp_path / '30' / 'commit_success.txt')
  with caplog.at_level('WARNING', logger='jaxdet.checkpoint'):
    with Checkpointer(tmp_path, max_to_keep=3) as ckpt:
      assert ckpt.half_written == ['20.orbax-checkpoint-tmp', '30']
      assert ckpt.latest_step() == 10
      ckpt.save(20, _state(2), data_state={'next_batch': 2})   # (awaits orbax's clean-up)
  assert sorted(os.listdir(tmp_path)) == ['10', '20', '30']
  messages = sorted({r.getMessage() for r in caplog.records if r.name == 'jaxdet.checkpoint'})
  assert len(messages) == 2, messages
  assert 'ignoring half-written checkpoint' in messages[0] and '20.orbax-checkpoint-tmp' in messages[0]
  assert 'deleting it' in messages[0]
  assert messages[1].startswith('ignoring half-written checkpoint') and 'never resumed' in messages[1]
  assert messages[1].split()[3] == str(tmp_path / '30')


def test_position_and_resume_line_by_hand():
  from jaxdet.engine.save_cadence import position, resume_line
  assert position(1, 100) == dict(step=1, epoch=1, iteration=1, steps_per_epoch=100)
  assert position(100, 100)['epoch'] == 1 and position(100, 100)['iteration'] == 100
  assert (position(101, 100)['epoch'], position(101, 100)['iteration']) == (2, 1)
  assert (position(250, 100)['epoch'], position(250, 100)['iteration']) == (3, 50)
  assert (position(0, 100)['epoch'], position(0, 100)['iteration']) == (1, 0)
  # The checkpoint's record wins over the current epoch length (another global batch).
  assert (resume_line(250, position(250, 100), {'batches_per_epoch': 100}, 50)
          == 'resumed from step 250 (epoch 3, iteration 50 of it)')
  # Older checkpoints: from the data state's epoch length, else the current one.
  assert (resume_line(250, {'epoch': 2}, {'batches_per_epoch': 100}, 7)
          == 'resumed from step 250 (epoch 3, iteration 50 of it)')
  assert resume_line(7, {}, None, 6) == 'resumed from step 7 (epoch 2, iteration 1 of it)'


class _Clock:
  def __init__(self):
    self.t = 1000.0

  def __call__(self):
    return self.t


def test_cadence_steps_minutes_and_saved_resets_the_clock():
  from jaxdet.engine.save_cadence import Cadence
  clock = _Clock()
  c = Cadence(every_steps=5, every_minutes=0, clock=clock, num_processes=1)
  assert [s for s in range(1, 21) if c.due(s)] == [5, 10, 15, 20]
  c = Cadence(every_steps=0, every_minutes=2, clock=clock, num_processes=1)
  clock.t += 119.9
  assert not c.due(3)
  clock.t += 0.1
  assert c.due(4) and c.due(5)     # due until a save happens
  c.saved()
  assert not c.due(6)
  clock.t += 120
  assert c.due(7)
  off = Cadence(0, None, clock=clock, num_processes=1)
  clock.t += 1e6
  assert not any(off.due(s) for s in range(1, 100))


def test_cadence_multi_process_reads_the_clock_only_at_sync_steps_and_broadcasts():
  """Every process must save at the same step: the clock is read at multiples of sync_every
  only, and process 0's answer (here: the fake broadcast's) decides."""
  from jaxdet.engine.save_cadence import Cadence
  clock, calls = _Clock(), []

  def broadcast(x):        # process 0 says "not yet" the first time, "yes" afterwards
    calls.append(bool(x))
    return np.asarray(len(calls) > 1)
  c = Cadence(0, 1, sync_every=10, clock=clock, num_processes=2, broadcast=broadcast)
  clock.t += 61
  assert [s for s in range(1, 25) if c.due(s)] == [20]
  assert calls == [True, True]      # asked at steps 10 and 20 only


def test_cadence_config_values():
  import ml_collections
  from jaxdet.engine.save_cadence import Cadence

  def cfg(**kw):
    return ml_collections.ConfigDict(dict(dict(checkpoint_every_steps=0, checkpoint_every_minutes=30.0,
                                               log_interval=50), **kw))
  c = Cadence.from_config(cfg(checkpoint_every_steps=None, checkpoint_every_minutes=None))
  assert (c.every_steps, c.every_seconds) == (0, 0)
  c = Cadence.from_config(cfg(checkpoint_every_steps=1000, checkpoint_every_minutes=0.5))
  assert (c.every_steps, c.every_seconds, c.sync_every) == (1000, 30.0, 50)
  with pytest.raises(ValueError, match=r'^config.checkpoint_every_steps must be an int >= 0'):
    Cadence.from_config(cfg(checkpoint_every_steps=-1))
  with pytest.raises(ValueError, match=r'^config.checkpoint_every_minutes must be a number >= 0'):
    Cadence.from_config(cfg(checkpoint_every_minutes=-5.0))
  with pytest.raises(ValueError, match=r"got 'often'"):
    Cadence.from_config(ml_collections.ConfigDict(dict(checkpoint_every_steps='often')))
