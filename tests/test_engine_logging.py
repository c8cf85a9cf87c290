"""MetricWriter (metrics.jsonl + TensorBoard events read back record by record), the log line,
device memory, setup_logging and the progress bar."""
import glob
import json
import logging
import os
import resource
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdet.engine.logging import MetricWriter
from jaxdet.engine.logging import ProgressBar
from jaxdet.engine.logging import device_memory_bytes
from jaxdet.engine.logging import format_log_line
from jaxdet.engine.logging import setup_logging


def _read_tfrecords(path):
  """A TFRecord file's payloads (length u64, crc u32, data, crc u32), read without TensorFlow."""
  records = []
  with open(path, 'rb') as f:
    while header := f.read(12):
      (length,) = struct.unpack('<Q', header[:8])
      records.append(f.read(length))
      f.read(4)
  return records


def _tb_scalars(tb_dir):
  event_pb2 = pytest.importorskip('tensorboardX.proto.event_pb2')
  files = glob.glob(os.path.join(tb_dir, 'events.out.tfevents.*'))
  assert len(files) == 1 and os.path.getsize(files[0]) > 0
  scalars = []
  for payload in _read_tfrecords(files[0]):
    event = event_pb2.Event.FromString(payload)
    for value in event.summary.value:
      number = value.simple_value if value.HasField('simple_value') else value.tensor.float_val[0]
      scalars.append((value.tag, event.step, number))
  return scalars


def test_metric_writer_jsonl_and_tensorboard(tmp_path):
  with MetricWriter(str(tmp_path)) as writer:
    writer.scalars(50, {'loss': jnp.float32(1.25), 'loss_cls': np.float64(0.5), 'lr': 0.01,
                        'epoch': 1})
    writer.scalars(100, {'kind': 'val', 'loss': 0.75, 'epoch': 1})   # kind inside the dict
    writer.scalars(100, {'mAP': 0.5, 'AP50': 0.75, 'epoch': 1, 'note': 'end'}, kind='eval')
  lines = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert lines == [
      {'kind': 'train', 'step': 50, 'loss': 1.25, 'loss_cls': 0.5, 'lr': 0.01, 'epoch': 1},
      {'kind': 'val', 'step': 100, 'loss': 0.75, 'epoch': 1},
      {'kind': 'eval', 'step': 100, 'mAP': 0.5, 'AP50': 0.75, 'epoch': 1, 'note': 'end'},
  ]
  assert isinstance(lines[0]['epoch'], int)
  scalars = _tb_scalars(str(tmp_path / 'tb'))
  expected = [('train/loss', 50, 1.25), ('train/loss_cls', 50, 0.5), ('train/lr', 50, 0.01),
              ('train/epoch', 50, 1.0), ('val/loss', 100, 0.75), ('val/epoch', 100, 1.0),
              ('eval/mAP', 100, 0.5), ('eval/AP50', 100, 0.75), ('eval/epoch', 100, 1.0)]
  assert [(t, s) for t, s, _ in scalars] == [(t, s) for t, s, _ in expected]
  np.testing.assert_allclose([v for *_, v in scalars], [v for *_, v in expected], rtol=1e-6)


def test_metric_writer_appends_and_can_skip_tensorboard(tmp_path):
  for step in (1, 2):   # two runs (a resume) append to the same file
    writer = MetricWriter(str(tmp_path), enable_tensorboard=False)
    writer.scalars(step, {'loss': float(step)})
    writer.close()
  steps = [json.loads(l)['step'] for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert steps == [1, 2]
  assert not os.path.exists(tmp_path / 'tb')


def test_format_log_line():
  line = format_log_line(1, 50, 500, 0.01, {'loss_cls': 0.8, 'loss_bbox': 0.4, 'loss_centerness': 0.0345},
                         img_per_s=12.34, eta_s=754, mem_bytes=int(1.2 * 2**30))
  assert line == ('Epoch(train) [1][ 50/500]  lr: 1.0000e-02  eta: 0:12:34  img/s: 12.3  '
                  'mem: 1.2 GB  loss: 1.2345  loss_cls: 0.8000  loss_bbox: 0.4000  '
                  'loss_centerness: 0.0345')
  # A given total comes first; missing fields are left out; small memory in MB; days in the ETA.
  line = format_log_line(12, 7, 7330, 2e-4, {'loss_cls': jnp.float32(0.5), 'loss': 2.0},
                         eta_s=90000 + 61, mem_bytes=345 * 2**20, mode='val')
  assert line == ('Epoch(val) [12][   7/7330]  lr: 2.0000e-04  eta: 1 day, 1:01:01  '
                  'mem: 345 MB  loss: 2.0000  loss_cls: 0.5000')
  # A global step is shown as the step within its epoch.
  assert format_log_line(2, 507, 500, None, {}).startswith('Epoch(train) [2][  7/500]')
  assert format_log_line(2, 1000, 500, None, {}) == 'Epoch(train) [2][500/500]'


def test_device_memory_bytes():
  mem = device_memory_bytes()
  assert isinstance(mem, int) and mem > 0
  # On XLA:CPU there are no allocator statistics: the peak RSS of this process.
  import jax
  if not jax.local_devices()[0].memory_stats():
    assert mem == resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.fixture
def jaxdet_logger():
  """Puts the 'jaxdet' logger back as it was (its handlers hold pytest's captured stdout)."""
  logger = logging.getLogger('jaxdet')
  saved = (list(logger.handlers), logger.level, logger.propagate)
  yield
  for handler in logger.handlers:
    handler.close()
  logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


def test_setup_logging_stdout_and_file(tmp_path, capsys, jaxdet_logger):
  logger = setup_logging(str(tmp_path))
  logger = setup_logging(str(tmp_path))   # again: no duplicated lines
  logging.getLogger('jaxdet.train').info('resumed from step 7')
  for handler in logger.handlers:
    handler.flush()
  out = capsys.readouterr().out
  assert out.count('resumed from step 7') == 1
  text = (tmp_path / 'train.log').read_text()
  assert text.count('resumed from step 7') == 1 and 'INFO' in text
  setup_logging(None)   # detaches the file
  logging.getLogger('jaxdet').info('not in the file')
  assert 'not in the file' not in (tmp_path / 'train.log').read_text()


def test_progress_bar_disabled_off_a_terminal(capsys):
  bar = ProgressBar(10, 'train')   # pytest's stderr is not a TTY
  assert not bar.enabled
  bar.update(3, loss=0.5)
  bar.close()
  assert capsys.readouterr().err == ''
  assert bar.n == 0
  with ProgressBar(4, 'val', enable=True) as bar:
    assert bar.enabled
    bar.update(3, loss=0.25)
    assert bar.n == 3
  assert 'val:' in capsys.readouterr().err
