"""DETR end to end: `jaxdet.train` (with a num_queries override and more gts per image than
queries), `jaxdet.evaluate`, `jaxdet.Detector` and `python -m jaxdet.infer` on a tiny checkpoint;
checkpoints that do not fit (another detector, another num_queries) are one-line errors.

A tiny DETR (configs/detr.py:smoke, no load_from, 64 px shapes, 6 steps) is trained once."""
import json
import os

import numpy as np
import pytest

from jaxdet import evaluate, infer
from jaxdet import train as train_lib
from jaxdet.engine import checkpoint as ckpt
from jaxdet.engine import config_cli
from jaxdet.inference import Detector
from jaxdet.models.detectors import build_detector

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = os.path.join(ROOT, 'configs', 'detr.py') + ':smoke'
STEPS = 6


def _overrides(cache_dir):
  return [f'--config.data.shapes.cache_dir={cache_dir}', '--config.data.shapes.num_train=16',
          '--config.data.shapes.num_val=8', '--config.data.shapes.size=64',
          '--config.data.img_scale=(64,64)', '--config.data.samples_per_gpu=4',
          '--config.data.val.samples_per_gpu=4', '--config.data.workers_per_gpu=0',
          '--config.data.max_gt=8', '--config.load_from=', '--config.log_interval=2',
          '--config.model.head.num_queries=5',          # the override; 8 gts > 5 queries
          '--config.model.head.embed_dims=32', '--config.model.neck.out_channels=32',
          '--config.model.head.feedforward_channels=64', '--config.model.head.num_heads=4',
          '--config.model.head.num_decoder_layers=2']


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp('detr')
  overrides = _overrides(str(root / 'shapes-cache'))
  config = config_cli.load_config(SPEC, overrides + [f'--config.max_steps={STEPS}'])
  work_dir = str(root / 'run')
  train_lib.train_and_evaluate(config, work_dir)
  (val_dir,) = [os.path.join(root, 'shapes-cache', d, 'val')
                for d in os.listdir(root / 'shapes-cache') if d.startswith('shapes-')]
  return overrides, work_dir, val_dir


def test_training_logs_the_18_terms(trained):
  _, work_dir, _ = trained
  with open(os.path.join(work_dir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  train_rows = [r for r in rows if 'loss_cls_d0' in r]
  assert train_rows
  row = train_rows[-1]
  names = [f'loss_{k}{s}' for k in ('cls', 'bbox', 'iou') for s in ('', '_d0')]  # 2 layers
  assert all(np.isfinite(row[n]) for n in names)
  assert 'num_unmatched_gts' in row
  with open(os.path.join(work_dir, 'train.log')) as f:
    log = f.read()
  assert log.count('stay unmatched') == 1         # data.max_gt 8 > 5 queries: warned once


def test_evaluate_and_detector(trained, capsys):
  overrides, work_dir, val_dir = trained
  evaluate.main(['--config', SPEC, *overrides, '--checkpoint', work_dir])
  assert 'mAP' in capsys.readouterr().out          # the results table
  detector = Detector.from_checkpoint(SPEC, work_dir, overrides=overrides)
  image = os.path.join(val_dir, sorted(os.listdir(val_dir))[0])
  det = detector(image, score_thr=0.0)
  assert len(det.boxes) == 5                        # every query of the top-k, no NMS
  assert np.all(det.boxes[:, 2:] >= det.boxes[:, :2])
  assert np.all(np.diff(det.scores) <= 0)


def test_infer_cli(trained, tmp_path):
  overrides, work_dir, val_dir = trained
  out = tmp_path / 'out'
  infer.main(['--config', SPEC, *overrides, '--checkpoint', work_dir, '--out', str(out),
              '--score-thr', '0', os.path.join(val_dir, sorted(os.listdir(val_dir))[0])])
  assert os.listdir(out)


def test_checkpoints_that_do_not_fit_are_one_line_errors(trained, tmp_path):
  overrides, work_dir, _ = trained
  with pytest.raises(ValueError) as info:               # another num_queries
    Detector.from_checkpoint(SPEC, work_dir, overrides=overrides + [
        '--config.model.head.num_queries=7'])
  assert '\n' not in str(info.value) and 'query_embedding' in str(info.value)
  # a checkpoint of another detector (ATSS smoke shapes)
  atss = config_cli.load_config(os.path.join(ROOT, 'configs', 'atss.py') + ':smoke')
  shapes = build_detector(atss.model).init_shapes((1, 64, 64, 3))
  variables = {k: {} if k not in shapes else __import__('jax').tree_util.tree_map(
      lambda s: np.zeros(s.shape, s.dtype), shapes[k]) for k in ('params', 'batch_stats')}
  with ckpt.Checkpointer(str(tmp_path / 'atss'), max_to_keep=1) as checkpointer:
    checkpointer.save(0, variables, data_state={}, extra={})
  with pytest.raises(ValueError) as info:
    evaluate.main(['--config', SPEC, *overrides, '--checkpoint', str(tmp_path / 'atss')])
  assert '\n' not in str(info.value) and 'does not fit' in str(info.value)
