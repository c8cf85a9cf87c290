"""Step checkpoints, SIGKILL and resume: a run killed (kill -9) while a (deliberately slowed)
background save is being written resumes from its last complete, mid-epoch checkpoint, logs and
deletes the half-written one, and ends with parameters and losses equal to an uninterrupted
run's, on 1 and 2 devices; max_to_keep over mixed step / epoch checkpoints; the resume line."""
import json
import os
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from jaxdet import train
from jaxdet.engine import checkpoint as ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATSS = os.path.join(ROOT, 'configs', 'atss.py')

# A child process: `devices` CPU devices; with `slow_step` > 0 the final rename of that step's
# checkpoint (orbax's AtomicRenameTemporaryPath.finalize, in the background thread) first prints
# a marker and sleeps, so the test can kill the process while that save is half written. Then
# it runs `python -m jaxdet.train ARGV` for each ARGV given (several runs share the process).
CHILD = textwrap.dedent('''
    import asyncio, json, os, sys
    devices, slow_step = int(sys.argv[2]), int(sys.argv[3])
    os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
    os.environ['JAX_PLATFORMS'] = 'cpu'
    sys.path.insert(0, sys.argv[1])
    from jaxdet.engine.xla_cpu_flags import set_xla_cpu_flags
    set_xla_cpu_flags()  # as the command and the tests' conftest: before JAX starts below
    if slow_step:
        from orbax.checkpoint._src.path import atomicity
        finalize = atomicity.AtomicRenameTemporaryPath.finalize
        async def slow_finalize(self, *args, **kwargs):
            if self.get().name.startswith(f'{slow_step}.'):
                print(f'SAVE OF STEP {slow_step} IN FLIGHT: {self.get()}', flush=True)
                await asyncio.sleep(600)
            return await finalize(self, *args, **kwargs)
        atomicity.AtomicRenameTemporaryPath.finalize = slow_finalize
    import jax
    assert jax.local_device_count() == devices
    from jaxdet import train
    for argv in json.loads(sys.argv[4]):
        train.main(argv)
''')


@pytest.fixture(scope='module')
def shapes_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp('shapes-cache'))


def _argv(cache, work_dir, devices):
  """configs/atss.py:smoke on 24 images of 64 px, global batch 4 on `devices` devices = 6 steps
  per epoch; 11 steps; a checkpoint every 4 steps and every epoch, the newest 3 kept: steps 4,
  6 (epoch 1), 8 (epoch 2, iteration 2), 11 (the end). The compiled programs are those of
  tests/test_train.py's tiny runs (1 device; 2 devices: its one-process run), so the persistent
  compilation cache of tests/conftest.py serves both files."""
  two = ['--config.model.backbone.norm_eval=True'] if devices == 2 else []
  return ['--config', f'{ATSS}:smoke', '--workdir', work_dir,
          f'--config.data.shapes.cache_dir={cache}', '--config.data.shapes.num_train=24',
          '--config.data.shapes.num_val=8', '--config.data.shapes.size=64',
          '--config.data.img_scale=(64,64)', f'--config.data.samples_per_gpu={4 // devices}',
          f'--config.data.val.samples_per_gpu={4 // devices}', '--config.data.workers_per_gpu=0',
          '--config.data.max_gt=8', '--config.schedule.warmup_iters=2',
          '--config.log_interval=1', '--config.eval_interval=100',
          "--config.workflow=(('train',1),)", '--config.max_steps=11',
          '--config.checkpoint_interval=1', '--config.checkpoint_every_steps=4',
          '--config.checkpoint_every_minutes=0', '--config.max_to_keep=3',
          '--config.cpu_devices=1'] + two


def _child(devices, slow_step, runs):
  cmd = [sys.executable, '-c', CHILD, ROOT, str(devices), str(slow_step), json.dumps(runs)]
  return cmd, dict(os.environ, PYTHONUNBUFFERED='1')


def _train_rows(work_dir):
  with open(os.path.join(work_dir, 'metrics.jsonl')) as f:
    return [r for r in map(json.loads, f) if r['kind'] == 'train']


@pytest.mark.slow
@pytest.mark.parametrize('devices', [1, 2])
def test_kill_during_a_save_resumes_from_the_last_complete_checkpoint_exactly(
    tmp_path, shapes_cache, devices):
  killed, reference = str(tmp_path / 'killed'), str(tmp_path / 'reference')
  checkpoints = os.path.join(killed, 'checkpoints')

  # 1. kill -9 while the save of step 11 is half written (steps 4, 6 and 8 are complete).
  cmd, env = _child(devices, 11, [_argv(shapes_cache, killed, devices)])
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  lines, deadline = [], time.time() + 900
  try:
    for line in proc.stdout:
      lines.append(line)
      if line.startswith('SAVE OF STEP 11 IN FLIGHT'):
        proc.kill()
        break
      assert time.time() < deadline, ''.join(lines)
  finally:
    proc.kill()
    proc.communicate(timeout=60)
  assert lines and lines[-1].startswith('SAVE OF STEP 11 IN FLIGHT'), ''.join(lines)
  assert ckpt.complete_steps(checkpoints)[-1] == 8
  assert ckpt.half_written(checkpoints) == ['11.orbax-checkpoint-tmp'], os.listdir(checkpoints)

  # 2. the same command again (it resumes), and an uninterrupted run: in this process on one
  # device, in one child process on two.
  runs = [_argv(shapes_cache, killed, devices), _argv(shapes_cache, reference, devices)]
  if devices == 1:
    for argv in runs:
      train.main(argv)
  else:
    cmd, env = _child(devices, 0, runs)
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
  with open(os.path.join(killed, 'train.log')) as f:
    log = f.read().split('resumed from step', 1)   # the killed run's log, then the resumed one's
  assert (f'ignoring half-written checkpoint {checkpoints}/11.orbax-checkpoint-tmp '
          '(a save cut short): deleting it') in log[0], log[0][-3000:]
  assert log[1].startswith(' 8 (epoch 2, iteration 2 of it)'), log[1][:200]
  with open(os.path.join(reference, 'train.log')) as f:
    assert 'resumed from step' not in f.read()   # the reference run started afresh

  # Same losses after the resume, same final parameters and optimizer state, bit for bit.
  resumed = {r['step']: r['loss'] for r in _train_rows(killed) if r['step'] > 8}
  expected = {r['step']: r['loss'] for r in _train_rows(reference) if r['step'] > 8}
  assert sorted(resumed) == [9, 10, 11] and resumed == expected
  with ckpt.Checkpointer(checkpoints) as a, \
       ckpt.Checkpointer(os.path.join(reference, 'checkpoints')) as b:
    # max_to_keep=3 over step and epoch checkpoints alike: step 4 went, epoch 1's end stayed.
    assert a.all_steps() == b.all_steps() == [6, 8, 11]
    assert a.half_written == [] and sorted(os.listdir(checkpoints)) == ['11', '6', '8']
  # Each checkpoint records where it is: (epoch, iteration) of its step.
  for step, epoch, iteration in ((6, 1, 6), (8, 2, 2), (11, 2, 5)):
    extra = ckpt.load_extra(checkpoints, step)
    assert (extra['step'], extra['epoch'], extra['iteration']) == (step, epoch, iteration)
  keys = ('params', 'batch_stats', 'opt_state', 'step')
  state_a = ckpt.load_params(checkpoints, keys=keys)
  state_b = ckpt.load_params(os.path.join(reference, 'checkpoints'), keys=keys)
  leaves_a, tree_a = jax.tree_util.tree_flatten(state_a)
  leaves_b, tree_b = jax.tree_util.tree_flatten(state_b)
  assert sorted(state_a) == sorted(keys) and tree_a == tree_b and int(state_a['step']) == 11
  for x, y in zip(leaves_a, leaves_b):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
