"""What a run tells its user: log lines, TensorBoard scalars, `metrics.jsonl`, a progress bar.

- `setup_logging(work_dir)`: the 'jaxdet' logger writes to stdout and appends to
  `work_dir/train.log` (a resumed run continues the same file).
- `MetricWriter(work_dir)`: `.scalars(step, {...}, kind='train')` appends
  `{"kind": "train", "step": 50, "loss": ...}` to `work_dir/metrics.jsonl` and writes the same
  numbers as TensorBoard scalars `train/loss`, ... under `work_dir/tb` (tensorboardX: no TensorFlow).
- `format_log_line(...)`: mmdetection's line,
  `Epoch(train) [1][ 50/500]  lr: 1.0000e-02  eta: 0:12:34  img/s: 12.3  mem: 1.2 GB  loss: ...`.
- `device_memory_bytes()`: peak memory of the first local device (its allocator's statistics),
  or the process's peak RSS where the backend has none (XLA:CPU).
- `ProgressBar(total)`: tqdm on a terminal, silent otherwise.

Multi-host: only process 0 writes files (`MetricWriter` does this by itself).
"""
import datetime
import json
import logging
import math
import numbers
import os
import resource
import sys

import jax
import numpy as np

LOGGER_NAME = 'jaxdet'
_FORMAT = '%(asctime)s - %(name)s - %(levelname)s - %(message)s'


# ------------------------------------------------------------------------------------ log lines

class _TqdmStreamHandler(logging.StreamHandler):
  """Prints through `tqdm.write`, so a progress bar on the terminal is redrawn below the line."""

  def emit(self, record):
    try:
      import tqdm  # pylint: disable=g-import-not-at-top
      tqdm.tqdm.write(self.format(record), file=self.stream)
      self.flush()
    except Exception:  # pylint: disable=broad-except
      self.handleError(record)


def setup_logging(work_dir: str | None = None, *, level=logging.INFO,
                  name: str = LOGGER_NAME) -> logging.Logger:
  """Configures logger `name` ('jaxdet', the parent of 'jaxdet.train' etc.) and returns it.

  Lines go to stdout and, when `work_dir` is given (and this is process 0), are appended to
  `work_dir/train.log`; other processes of a multi-host run print warnings and errors only (as
  mmdetection's non-zero ranks). Calling it again replaces the handlers it added before.
  """
  logger = logging.getLogger(name)
  logger.setLevel(level if jax.process_index() == 0 else max(level, logging.WARNING))
  logger.propagate = False
  for handler in list(logger.handlers):
    if getattr(handler, '_jaxdet', False):
      logger.removeHandler(handler)
      handler.close()
  formatter = logging.Formatter(_FORMAT, datefmt='%Y/%m/%d %H:%M:%S')
  handlers = [_TqdmStreamHandler(sys.stdout)]
  if work_dir is not None and jax.process_index() == 0:
    os.makedirs(work_dir, exist_ok=True)
    handlers.append(logging.FileHandler(os.path.join(work_dir, 'train.log'), mode='a'))
  for handler in handlers:
    handler._jaxdet = True  # pylint: disable=protected-access
    handler.setFormatter(formatter)
    logger.addHandler(handler)
  return logger


def format_log_line(epoch: int, step: int, steps_per_epoch: int, lr: float, losses: dict,
                    img_per_s: float | None = None, eta_s: float | None = None,
                    mem_bytes: int | None = None, *, mode: str = 'train') -> str:
  """mmdetection's progress line.

  `epoch` (1-based) as shown; `step` the 1-based step within the epoch (a global step is
  reduced to it: `(step - 1) % steps_per_epoch + 1`); `lr` the current learning rate; `losses` name -> scalar, shown in its order after `loss` (given, or the sum of the
  entries whose names start with 'loss'); None fields are left out. E.g.
  `Epoch(train) [1][ 50/500]  lr: 1.0000e-02  eta: 0:12:34  img/s: 12.3  mem: 1.2 GB  loss: 1.2345  loss_cls: 0.8000`.
  """
  width = len(str(steps_per_epoch))
  if step > steps_per_epoch:
    step = (step - 1) % steps_per_epoch + 1
  parts = [f'Epoch({mode}) [{epoch}][{step:>{width}}/{steps_per_epoch}]']
  if lr is not None:
    parts.append(f'lr: {float(lr):.4e}')
  if eta_s is not None:
    parts.append(f'eta: {format_eta(eta_s)}')
  if img_per_s is not None:
    parts.append(f'img/s: {float(img_per_s):.1f}')
  if mem_bytes is not None:
    parts.append(f'mem: {format_bytes(mem_bytes)}')
  values = {k: float(np.asarray(v)) for k, v in losses.items()}
  if 'loss' not in values:
    terms = [v for k, v in values.items() if k.startswith('loss')]
    if terms:
      values = {'loss': sum(terms), **values}
  else:
    values = {'loss': values.pop('loss'), **values}
  parts.extend(f'{k}: {v:.4f}' for k, v in values.items())
  return '  '.join(parts)


def format_eta(seconds: float) -> str:
  """Seconds -> 'H:MM:SS' (or 'D days, H:MM:SS'); '?' for inf/NaN."""
  if not math.isfinite(seconds):
    return '?'
  return str(datetime.timedelta(seconds=int(round(max(seconds, 0)))))


def format_bytes(n: int) -> str:
  """Bytes -> '1.2 GB' (from 1 GiB up) or '345 MB' (binary units, as mmdetection's MB)."""
  n = float(n)
  return f'{n / 2**30:.1f} GB' if n >= 2**30 else f'{n / 2**20:.0f} MB'


def device_memory_bytes() -> int:
  """Peak bytes in use on `jax.local_devices()[0]`, or this process's peak RSS where the device
  keeps no statistics (XLA:CPU)."""
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  if stats:
    for key in ('peak_bytes_in_use', 'bytes_in_use'):
      if key in stats:
        return int(stats[key])
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(peak if sys.platform == 'darwin' else peak * 1024)  # macOS: bytes, Linux: KiB


# -------------------------------------------------------------------------------------- metrics

class MetricWriter:
  """Scalars to `work_dir/metrics.jsonl` and TensorBoard (`work_dir/tb`).

  `enable_tensorboard=False` writes only the JSON lines. Only process 0 writes anything.
  """

  def __init__(self, work_dir: str, *, enable_tensorboard: bool = True):
    self.work_dir = work_dir
    self.active = jax.process_index() == 0
    self.jsonl_path = os.path.join(work_dir, 'metrics.jsonl')
    self._tb = None
    if not self.active:
      return
    os.makedirs(work_dir, exist_ok=True)
    if enable_tensorboard:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._tb = tensorboardX.SummaryWriter(os.path.join(work_dir, 'tb'))

  def scalars(self, step: int, values: dict, *, kind: str = 'train') -> dict:
    """Logs `values` (name -> number; numpy/jax scalars are fine) at `step`.

    Appends one JSON line `{"kind": kind, "step": step, **values}` (ints stay ints, strings are
    kept) and writes each number as TensorBoard scalar `<kind>/<name>`. A 'kind' entry in
    `values` is taken as `kind`. Returns the record.
    """
    values = dict(values)
    kind = values.pop('kind', kind)
    record = {'kind': kind, 'step': int(step)}
    record.update({str(k): _plain(v) for k, v in values.items()})
    if not self.active:
      return record
    with open(self.jsonl_path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    if self._tb is not None:
      for name, value in record.items():
        if name in ('kind', 'step') or isinstance(value, bool):
          continue
        if isinstance(value, numbers.Real):
          self._tb.add_scalar(f'{kind}/{name}', float(value), global_step=int(step))
      self._tb.flush()
    return record

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _plain(value):
  """numpy / jax scalars -> Python numbers; other values unchanged (must be JSON-able)."""
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    value = np.asarray(value)
    if value.ndim == 0:
      return value.item()
    return value.tolist()
  return value


# ---------------------------------------------------------------------------------- progress bar

class ProgressBar:
  """A tqdm bar over `total` steps when stderr is a terminal (or `enable=True`); else a no-op.

  `update(n=1, **postfix)` advances it and shows `postfix` (e.g. loss=0.52); `close()` ends it.
  """

  def __init__(self, total: int | None, desc: str = '', *, initial: int = 0,
               enable: bool | None = None):
    if enable is None:
      enable = sys.stderr.isatty() and jax.process_index() == 0
    self._bar = None
    if enable:
      import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm.tqdm(total=total, desc=desc, initial=initial, dynamic_ncols=True,
                            leave=False)

  @property
  def enabled(self) -> bool:
    return self._bar is not None

  @property
  def n(self) -> int:
    """Steps counted so far (0 when disabled)."""
    return self._bar.n if self._bar is not None else 0

  def update(self, n: int = 1, **postfix) -> None:
    if self._bar is None:
      return
    if postfix:
      self._bar.set_postfix({k: (f'{v:.4f}' if isinstance(v, float) else v)
                             for k, v in postfix.items()}, refresh=False)
    self._bar.update(n)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
