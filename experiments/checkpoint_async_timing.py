"""Train-step time with and without a checkpoint save in flight (issue #19), and what a save
blocks the loop for, asynchronous (orbax background thread) vs synchronous.

Builds the run of `python -m jaxdet.train` (its `build_data`, `create_state`, `compile_steps`)
for a config, compiles, then measures on the same state:
  idle       : steps with no save in flight (each step blocked until done)
  in flight  : steps while an async save of the current state is being written
  async save : the time `Checkpointer.save` blocks the loop (state to host, start of the write)
  sync save  : the time a synchronous save blocks it (`async_save=False`)

  nice -n 5 python experiments/checkpoint_async_timing.py --config configs/atss.py:smoke \
      --override --config.data.img_scale='(64,64)' ... --saves 5

The numbers are only meaningful on an otherwise idle machine; on a shared CPU the background
writer competes with the step for the same cores (and so do the neighbours).
"""
import argparse
import os
import shutil
import tempfile
import time

import jax
import numpy as np

from jaxdet import train
from jaxdet.engine import checkpoint as ckpt
from jaxdet.engine import config_cli
from jaxdet.engine.schedules import build_schedule
from jaxdet.engine.train_state import replicate, unreplicate
from jaxdet.models.detectors import build_detector


def _step(steps, state, batch):
  state, metrics = steps.train(state, batch)
  jax.block_until_ready(metrics)
  return state


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/atss.py:smoke')
  parser.add_argument('--override', action='append', default=[])
  parser.add_argument('--idle_steps', type=int, default=20)
  parser.add_argument('--saves', type=int, default=5)
  args = parser.parse_args()
  config = config_cli.load_config(args.config, args.override)
  _, train_loader, _ = train.build_data(config)
  detector = build_detector(config.model, config.dtype)
  schedule = build_schedule(0.01, config.schedule, steps_per_epoch=train_loader.batches_per_epoch)
  work = tempfile.mkdtemp(prefix='ckpt_timing_')
  try:
    checkpointer = ckpt.Checkpointer(os.path.join(work, 'async'), max_to_keep=2)
    sync = ckpt.Checkpointer(os.path.join(work, 'sync'), max_to_keep=2, async_save=False)
    host_state, tx, _ = train.create_state(config, detector, train_loader, schedule, checkpointer,
                                           '')
    steps = train.compile_steps(config, detector, tx)
    state = replicate(host_state)
    iterator = train_loader.iterator(None)
    batch = next(iterator)
    for _ in range(3):   # compile, warm up
      state = _step(steps, state, batch)
    size = sum(np.asarray(x).nbytes for x in jax.tree.leaves(host_state))

    idle = []
    for _ in range(args.idle_steps):
      t = time.perf_counter()
      state = _step(steps, state, batch)
      idle.append(time.perf_counter() - t)
    in_flight, blocked, blocked_sync, write = [], [], [], []
    for i in range(args.saves):
      t = time.perf_counter()
      checkpointer.save(100 + i, unreplicate(state), data_state={})
      blocked.append(time.perf_counter() - t)
      t_save = t
      while checkpointer.saving():
        t = time.perf_counter()
        state = _step(steps, state, batch)
        in_flight.append(time.perf_counter() - t)
      write.append(time.perf_counter() - t_save)
      t = time.perf_counter()
      sync.save(200 + i, unreplicate(state), data_state={})
      blocked_sync.append(time.perf_counter() - t)
    checkpointer.close()
    sync.close()
  finally:
    shutil.rmtree(work, ignore_errors=True)

  def ms(x):
    return f'median {1e3 * np.median(x):.0f} ms (mean {1e3 * np.mean(x):.0f}, n={len(x)})'
  print(f'state: {size / 2**20:.1f} MiB on the host; global batch {train_loader.global_batch}, '
        f'{jax.local_device_count()} device(s) {jax.devices()[0].platform}')
  print(f'step, no save in flight : {ms(idle)}')
  print(f'step, save in flight    : {ms(in_flight) if in_flight else "(save done before a step)"}')
  print(f'async save blocks loop  : {ms(blocked)}; the write took {ms(write)} in the background')
  print(f'sync save blocks loop   : {ms(blocked_sync)}')


if __name__ == '__main__':
  main()
