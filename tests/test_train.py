"""The real training loop on tiny data: loss goes down, resume == uninterrupted, 1 vs 8 devices,
parameter counts of the full configs, bad overrides."""
import os
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from jaxdet.engine import checkpoint as ckpt
from jaxdet.engine import config_cli
from jaxdet.train import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATSS = os.path.join(ROOT, 'configs', 'atss.py')


def tiny_overrides(cache_dir):
  """configs/atss.py:smoke shrunk to seconds: 64 px images, 24 train / 8 val images."""
  return [f'--config.data.shapes.cache_dir={cache_dir}', '--config.data.shapes.num_train=24',
          '--config.data.shapes.num_val=8', '--config.data.shapes.size=64',
          '--config.data.img_scale=(64,64)', '--config.data.samples_per_gpu=4',
          '--config.data.val.samples_per_gpu=4', '--config.data.workers_per_gpu=0',
          '--config.data.max_gt=8', '--config.schedule.warmup_iters=2',
          '--config.log_interval=1', '--config.eval_interval=100',
          '--config.checkpoint_interval=100', "--config.workflow=(('train',1),('val',1))",
          '--config.cpu_devices=1']


@pytest.fixture(scope='session')
def shapes_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp('shapes-cache'))


def _run(tmp_path, cache, name, *extra):
  config = config_cli.load_config(f'{ATSS}:smoke', tiny_overrides(cache) + list(extra))
  work_dir = str(tmp_path / name)
  metrics = train_and_evaluate(config, work_dir)
  params = ckpt.load_params(os.path.join(work_dir, 'checkpoints'))
  return config, work_dir, metrics, params


def _read_losses(work_dir):
  import json
  with open(os.path.join(work_dir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return [r for r in rows if r['kind'] == 'train'], rows


def test_resume_equals_uninterrupted_run(tmp_path, shapes_cache):
  """6 steps in one go == 3 steps, stop, then the same command resumed to 6 (same data order)."""
  _, wd_a, metrics, params_a = _run(tmp_path, shapes_cache, 'a', '--config.max_steps=6')
  assert set(metrics) >= {'mAP', 'AP50', 'AP75', 'APs', 'APm', 'APl'}
  train_a, rows_a = _read_losses(wd_a)
  assert [r['step'] for r in train_a] == [1, 2, 3, 4, 5, 6]
  assert any(r['kind'] == 'eval' for r in rows_a)
  assert any(r['kind'] == 'val' for r in rows_a)   # the val-loss phase of the workflow
  assert os.path.exists(os.path.join(wd_a, 'results.md'))
  assert os.path.exists(os.path.join(wd_a, 'detections_epoch_1.json'))

  _run(tmp_path, shapes_cache, 'b', '--config.max_steps=3')
  _, wd_b, _, params_b = _run(tmp_path, shapes_cache, 'b', '--config.max_steps=6')
  train_b, _ = _read_losses(wd_b)
  # the resumed run logs steps 4..6 with the same losses as the uninterrupted one
  resumed = {r['step']: r['loss'] for r in train_b if r['step'] > 3}
  assert sorted(resumed) == [4, 5, 6]
  for r in train_a[3:]:
    assert resumed[r['step']] == r['loss']
  flat_a = jax.tree_util.tree_leaves(params_a)
  flat_b = jax.tree_util.tree_leaves(params_b)
  assert len(flat_a) == len(flat_b)
  for a, b in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_loss_decreases_on_a_fixed_batch(tmp_path, shapes_cache):
  """Overfit one batch: the same 4 images every step (1 batch per epoch)."""
  _, wd, _, _ = _run(tmp_path, shapes_cache, 'fixed', '--config.data.shapes.num_train=4',
                     '--config.schedule.epochs=30', '--config.max_steps=30',
                     '--config.schedule.milestones=(6,7)',   # the smoke's 8-epoch schedule
                     '--config.optimizer.base_lr=0.02', "--config.workflow=(('train',1),)",
                     '--config.data.pipeline.flip_ratio=0.0')
  train, _ = _read_losses(wd)
  losses = [r['loss'] for r in train]
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3]), losses


def test_info_cli_prints_total():
  out = subprocess.run([sys.executable, '-m', 'jaxdet.info', '--config', ATSS], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert 'total 32,295,322' in out.stdout


def test_bad_override_is_one_line_error():
  out = subprocess.run([sys.executable, '-m', 'jaxdet.train', '--config', f'{ATSS}:smoke',
                        '--config.optimizer.base_lrr=0.1'], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 2
  assert out.stderr.strip() == ("error: unknown config key 'optimizer.base_lrr' "
                                "(did you mean 'optimizer.base_lr'?)")


EIGHT_DEVICES = textwrap.dedent('''
    import os, sys
    os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
    os.environ['JAX_PLATFORMS'] = 'cpu'
    sys.path.insert(0, sys.argv[1])
    import functools
    import jax, numpy as np
    from jaxdet.engine import config_cli
    from jaxdet.engine.schedules import build_schedule
    from jaxdet.models.detectors import build_detector
    from jaxdet.engine import steps as T, train_state as TS
    assert jax.local_device_count() == 8
    config = config_cli.load_config(sys.argv[2] + ':smoke', [
        '--config.model.backbone.norm_eval=True'])   # BN batch statistics are per device
    det = build_detector(config.model)
    sched = build_schedule(0.02, config.schedule, steps_per_epoch=10)
    state, tx = TS.create_train_state(det, config, (1, 64, 64, 3), sched)
    rng = np.random.default_rng(0)
    G = 4
    xy = rng.uniform(0, 40, (8, G, 2)); wh = rng.uniform(6, 24, (8, G, 2))
    batch = dict(image=rng.integers(0, 255, (8, 64, 64, 3), dtype=np.uint8),
                 gt_boxes=np.concatenate([xy, xy + wh], -1).astype(np.float32),
                 gt_labels=rng.integers(0, 5, (8, G)).astype(np.int32),
                 gt_mask=np.arange(G)[None].repeat(8, 0) < rng.integers(1, G + 1, (8, 1)),
                 img_shape=np.full((8, 2), 64, np.int32), pad_shape=np.full((8, 2), 64, np.int32))
    def run(num_devices):
        devices = jax.local_devices()[:num_devices]
        step = jax.pmap(functools.partial(T.train_step, detector=det, tx=tx,
                                          pipeline=config.data.pipeline, dtype=np.float32),
                        axis_name=T.AXIS, devices=devices)
        s = jax.tree_util.tree_map(lambda x: np.broadcast_to(x, (num_devices,) + np.shape(x)), state)
        b = {k: v.reshape((num_devices, 8 // num_devices) + v.shape[1:]) for k, v in batch.items()}
        losses = []
        for _ in range(2):
            s, m = step(s, b)
            losses.append(float(m['loss'][0]))
        return losses, jax.device_get(jax.tree_util.tree_map(lambda x: x[0], s['params']))
    l1, p1 = run(1)
    l8, p8 = run(8)
    print('losses', l1, l8)
    np.testing.assert_allclose(l1, l8, rtol=2e-5)
    for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p8)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    print('EQUAL')
''')


@pytest.mark.slow
def test_one_vs_eight_devices_same_loss_and_update():
  """Global batch 8 as 1 device x 8 images and as 8 devices x 1 image: same loss, same update
  (mmdetection's cross-device normalisers: pmean of the positive counts)."""
  out = subprocess.run([sys.executable, '-c', EIGHT_DEVICES, ROOT, ATSS], capture_output=True,
                       text=True, timeout=900)
  assert out.returncode == 0, out.stdout + out.stderr
  assert 'EQUAL' in out.stdout


def test_sigterm_saves_then_the_same_command_resumes_and_evaluate_cli(tmp_path, shapes_cache):
  """A preempted run (SIGTERM) saves a checkpoint and exits; rerunning the same command resumes
  from that step; `python -m jaxdet.evaluate` then scores the checkpoint."""
  import signal
  import time
  work_dir = str(tmp_path / 'preempted')
  cmd = [sys.executable, '-m', 'jaxdet.train', '--config', f'{ATSS}:smoke', '--workdir',
         work_dir] + tiny_overrides(shapes_cache)
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  proc = subprocess.Popen(cmd + ['--config.max_steps=500', '--config.schedule.epochs=1000'],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  lines = []
  deadline = time.time() + 600
  for line in proc.stdout:
    lines.append(line)
    if re.search(r'Epoch\(train\) \[1\]\[\s*2/', line):
      proc.send_signal(signal.SIGTERM)
      break
    assert time.time() < deadline, ''.join(lines)
  rest, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, ''.join(lines) + rest
  stopped = re.findall(r'stopped by signal at step (\d+);', rest)
  assert stopped, rest
  step = int(stopped[0])
  assert step >= 2
  assert ckpt.Checkpointer(os.path.join(work_dir, 'checkpoints'), max_to_keep=3).latest_step() == step

  out = subprocess.run(cmd + [f'--config.max_steps={step + 1}', '--config.schedule.epochs=1000'],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout + out.stderr
  assert f'resumed from step {step}' in out.stdout

  out = subprocess.run([sys.executable, '-m', 'jaxdet.evaluate', '--config', f'{ATSS}:smoke',
                        '--checkpoint', work_dir] + tiny_overrides(shapes_cache), cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout + out.stderr
  assert '| mAP | AP50 | AP75 | APs | APm | APl |' in out.stdout


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, shapes_cache):
  """A diverging run (absurd LR after a resume) stops with an error naming the last good
  checkpoint, writes no checkpoint after it, and that checkpoint still restores."""
  _, wd, _, good = _run(tmp_path, shapes_cache, 'diverge', '--config.max_steps=6',
                        '--config.checkpoint_interval=1')   # 6 steps = 1 epoch -> step 6 saved
  with pytest.raises(FloatingPointError, match=r'at step (\d+): stopping; the last good '
                                               r'checkpoint is step 6'):
    _run(tmp_path, shapes_cache, 'diverge', '--config.max_steps=30',
         '--config.checkpoint_interval=1', '--config.optimizer.base_lr=1e12')
  checkpoints = ckpt.Checkpointer(os.path.join(wd, 'checkpoints'), max_to_keep=3)
  assert checkpoints.latest_step() == 6
  checkpoints.close()
  restored = ckpt.load_params(os.path.join(wd, 'checkpoints'))
  for a, b in zip(jax.tree_util.tree_leaves(good), jax.tree_util.tree_leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bfloat16_training_on_cpu(tmp_path, shapes_cache):
  """config.dtype=bfloat16: bf16 compute, float32 parameters and finite float32 losses."""
  config, wd, _, params = _run(tmp_path, shapes_cache, 'bf16', '--config.max_steps=3',
                               '--config.dtype=bfloat16')
  from jaxdet.models.detectors import build_detector
  module = build_detector(config.model, config.dtype).module
  image = jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32)
  variables = jax.eval_shape(module.init, jax.random.key(0), image)
  outputs = jax.eval_shape(module.apply, variables, image)
  assert {x.dtype for x in jax.tree_util.tree_leaves(outputs)} == {np.dtype('bfloat16')}
  train, _ = _read_losses(wd)
  assert [r['step'] for r in train] == [1, 2, 3]
  assert all(np.isfinite(r['loss']) for r in train)
  assert {np.asarray(x).dtype for x in jax.tree_util.tree_leaves(params)} == {np.dtype(np.float32)}


def test_resume_with_another_global_batch_continues_the_epoch(tmp_path, shapes_cache):
  """Stopped at batch 3 of 6 (global batch 4), resumed with global batch 2 (12 batches per epoch):
  continues at step 6 = batch 6/12 of epoch 1, the LR schedule and the optimizer counters there,
  parameters and momentum carried over."""
  _, wd, _, params_a = _run(tmp_path, shapes_cache, 'regb', '--config.max_steps=3')
  config, wd, _, _ = _run(tmp_path, shapes_cache, 'regb', '--config.max_steps=8',
                          '--config.data.samples_per_gpu=2', '--config.optimizer.base_lr=0.0')
  train, _ = _read_losses(wd)
  assert [r['step'] for r in train] == [1, 2, 3, 7, 8]
  with open(os.path.join(wd, 'train.log')) as f:
    text = f.read()
  assert 'resumed from step 3' in text
  assert 'global batch 4 -> 2: epoch 1 batch 3/6 continues as batch 6/12 (step 6)' in text
  state = ckpt.Checkpointer(os.path.join(wd, 'checkpoints'), max_to_keep=3)
  assert state.latest_step() == 8
  state.close()
  # lr 0 after the resume: the parameters are exactly those of step 3 (BN statistics move)
  params_b = ckpt.load_params(os.path.join(wd, 'checkpoints'))
  for a, b in zip(jax.tree_util.tree_leaves(params_a['params']),
                  jax.tree_util.tree_leaves(params_b['params'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _free_port():
  import socket
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_as_one_process_with_two_devices(tmp_path, shapes_cache):
  """Multi-host through JAX's own `jax.distributed` (gloo collectives on CPU): 2 processes x 1
  device give the same global batch, losses, parameters and COCO metrics as 1 process x 2
  devices; only process 0 writes the logs, metrics and detections."""
  overrides = tiny_overrides(shapes_cache) + [
      '--config.max_steps=3', '--config.data.samples_per_gpu=2',
      '--config.data.val.samples_per_gpu=2', '--config.model.backbone.norm_eval=True']
  # The dataset is written once, before the processes that read it start.
  config = config_cli.load_config(f'{ATSS}:smoke', overrides)
  from jaxdet.data.sources import build_source
  build_source(config.data, 'train'), build_source(config.data, 'val')
  cmd = [sys.executable, '-m', 'jaxdet.train', '--config', f'{ATSS}:smoke'] + overrides

  def env(devices):
    return dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
                JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')

  one = str(tmp_path / 'one_process')
  out = subprocess.run(cmd + ['--workdir', one], cwd=ROOT, env=env(2), capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stdout + out.stderr
  assert 'global batch 4 = 2 devices x 2 images' in out.stdout

  two = str(tmp_path / 'two_processes')
  port = _free_port()
  procs = [subprocess.Popen(cmd + ['--workdir', two, f'--coordinator_address=127.0.0.1:{port}',
                                   '--num_processes=2', f'--process_id={i}'],
                            cwd=ROOT, env=env(1), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], '\n'.join(logs)
  assert 'global batch 4 = 2 devices x 2 images' in logs[0]
  assert 'Epoch(train)' not in logs[1]   # process 1 trains silently

  train_one, rows_one = _read_losses(one)
  train_two, rows_two = _read_losses(two)
  assert [r['step'] for r in train_two] == [1, 2, 3]
  np.testing.assert_allclose([r['loss'] for r in train_two], [r['loss'] for r in train_one],
                             rtol=1e-6)
  eval_one = [r for r in rows_one if r['kind'] == 'eval']
  eval_two = [r for r in rows_two if r['kind'] == 'eval']
  assert len(eval_two) == 1 and eval_two[0]['mAP'] == pytest.approx(eval_one[0]['mAP'], abs=1e-6)
  params_one = ckpt.load_params(os.path.join(one, 'checkpoints'))
  params_two = ckpt.load_params(os.path.join(two, 'checkpoints'))
  for a, b in zip(jax.tree_util.tree_leaves(params_one), jax.tree_util.tree_leaves(params_two)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)


def test_distributed_flag_that_is_not_an_int_is_a_one_line_error():
  from jaxdet.train import initialize_distributed
  with pytest.raises(config_cli.ConfigError, match=r"^--num_processes must be an int, got 'two'$"):
    initialize_distributed({'coordinator_address': '127.0.0.1:1', 'num_processes': 'two'})
