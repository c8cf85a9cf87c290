"""When to checkpoint between epoch ends, and where a checkpoint is in the run.

Besides mmdetection's epoch checkpoints (`config.checkpoint_interval`, in epochs), a run saves
every `config.checkpoint_every_steps` steps and/or whenever `config.checkpoint_every_minutes`
minutes have passed since its last save (of any kind); 0 or None turns either off.

Steps and epochs are 1-based as in the log lines: step `s` (the number of optimizer steps done)
is iteration `i` of epoch `e` with `e = (s - 1) // steps_per_epoch + 1`,
`i = s - (e - 1) * steps_per_epoch`; so the end of epoch 2 of 100 steps is step 200 =
(epoch 2, iteration 100).
"""
import time
from typing import Callable

import jax
import numpy as np


def position(step: int, steps_per_epoch: int) -> dict:
  """`dict(step, epoch, iteration, steps_per_epoch)` of `step` (see the module docstring)."""
  step, steps_per_epoch = int(step), int(steps_per_epoch)
  epoch = max(step - 1, 0) // steps_per_epoch + 1
  return dict(step=step, epoch=epoch, iteration=step - (epoch - 1) * steps_per_epoch,
              steps_per_epoch=steps_per_epoch)


def resume_line(step: int, extra: dict, data_state: dict | None, steps_per_epoch: int) -> str:
  """`resumed from step N (epoch E, iteration I of it)`, from the position the checkpoint
  recorded (`extra`); older checkpoints without it: from the step and the epoch length the data
  state recorded (else `steps_per_epoch`, the current one)."""
  if 'epoch' in extra and 'iteration' in extra:
    epoch, iteration = int(extra['epoch']), int(extra['iteration'])
  else:
    length = (data_state or {}).get('batches_per_epoch') or steps_per_epoch
    p = position(step, length)
    epoch, iteration = p['epoch'], p['iteration']
  return f'resumed from step {int(step)} (epoch {epoch}, iteration {iteration} of it)'


def _interval(config, key, kind):
  value = config.get(key)
  if value is None or value is False:
    return 0
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
      or value < 0 or (kind is int and int(value) != value):
    raise ValueError(f'config.{key} must be {"an int" if kind is int else "a number"} >= 0 '
                     f'(0 or None: off), got {value!r}')
  return kind(value)


class Cadence:
  """`due(step)`: whether to checkpoint after `step` besides the epoch-end checkpoints.

  every_steps: save when `step % every_steps == 0`; every_minutes: save when that long has
  passed since the last save (or since the Cadence was made); 0 turns either off. Call
  `saved()` after every save (epoch ones too) to restart the clock.

  Multi-process runs must take the same decision on every process, or orbax's save barriers
  hang: there the clock is read only every `sync_every` steps (the log interval, where the host
  waits for the device anyway) and process 0's answer is broadcast (`broadcast`, default
  `jax.experimental.multihost_utils.broadcast_one_to_all`).
  """

  def __init__(self, every_steps: int = 0, every_minutes: float = 0, *, sync_every: int = 1,
               clock: Callable[[], float] = time.monotonic, num_processes: int | None = None,
               broadcast: Callable | None = None):
    self.every_steps = int(every_steps or 0)
    self.every_seconds = 60.0 * float(every_minutes or 0)
    self.sync_every = max(int(sync_every), 1)
    self._clock = clock
    self._num_processes = jax.process_count() if num_processes is None else num_processes
    self._broadcast = broadcast
    self._last = clock()

  @classmethod
  def from_config(cls, config, **kwargs):
    """From `config.checkpoint_every_steps` / `checkpoint_every_minutes` (ValueError if bad)."""
    return cls(_interval(config, 'checkpoint_every_steps', int),
               _interval(config, 'checkpoint_every_minutes', float),
               sync_every=config.get('log_interval') or 1, **kwargs)

  def saved(self) -> None:
    self._last = self._clock()

  def due(self, step: int) -> bool:
    if self.every_steps and step % self.every_steps == 0:
      return True
    if not self.every_seconds:
      return False
    if self._num_processes == 1:
      return self._clock() - self._last >= self.every_seconds
    if step % self.sync_every:
      return False
    late = self._clock() - self._last >= self.every_seconds
    broadcast = self._broadcast
    if broadcast is None:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      broadcast = multihost_utils.broadcast_one_to_all
    return bool(np.asarray(broadcast(np.asarray(late))))
