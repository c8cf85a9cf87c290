"""Inference (issue 7): the Detector API against the evaluation path, `python -m jaxdet.infer`
(drawing, COCO JSON, folders, bad images, bad checkpoints) and `load_from` fine-tuning.

One tiny ATSS checkpoint (the smoke config on 64 px shapes, 20 steps) is trained once for the
module; its scores are low, so the tests use a low `model.test_cfg.score_thr`.
"""
import functools
import json
import logging
import os
import re
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from jaxdet import evaluation, infer
from jaxdet import train as train_lib
from jaxdet.data import shapes
from jaxdet.engine import checkpoint as ckpt
from jaxdet.engine import config_cli
from jaxdet.engine.config_cli import ConfigError, parse_args
from jaxdet.inference import Detections, Detector, box_outline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = os.path.join(ROOT, 'configs', 'atss.py') + ':smoke'
STEPS = 20


def _overrides(cache_dir):
  return [f'--config.data.shapes.cache_dir={cache_dir}', '--config.data.shapes.num_train=24',
          '--config.data.shapes.num_val=8', '--config.data.shapes.size=64',
          '--config.data.img_scale=(64,64)', '--config.data.samples_per_gpu=4',
          '--config.data.val.samples_per_gpu=4', '--config.data.workers_per_gpu=0',
          '--config.data.max_gt=8', '--config.schedule.warmup_iters=2',
          '--config.log_interval=100', '--config.eval_interval=100',
          '--config.checkpoint_interval=100', "--config.workflow=(('train',1),)",
          '--config.schedule.epochs=100', '--config.model.test_cfg.score_thr=0.01']


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """(overrides, work_dir, val image folder) of a 20-step run of the tiny smoke config."""
  root = tmp_path_factory.mktemp('infer')
  overrides = _overrides(str(root / 'shapes-cache'))
  config = config_cli.load_config(SPEC, overrides + [f'--config.max_steps={STEPS}'])
  work_dir = str(root / 'run')
  train_lib.train_and_evaluate(config, work_dir)
  (val_dir,) = [os.path.join(root, 'shapes-cache', d, 'val')
                for d in os.listdir(root / 'shapes-cache') if d.startswith('shapes-')]
  return overrides, work_dir, val_dir


@pytest.fixture(scope='module')
def detector(trained):
  overrides, work_dir, _ = trained
  return Detector.from_checkpoint(SPEC, work_dir, overrides=overrides)


def _run_cli(argv, capsys):
  """`python -m jaxdet.infer ARGV` in this process: (exit code, stdout, stderr)."""
  try:
    code = config_cli.main_error_exit(infer.main, argv)
  except SystemExit as e:
    code = e.code
  out = capsys.readouterr()
  return code, out.out, out.err


# ----------------------------------------------------------------------------- command line

def test_parse_args_positionals_and_bool_flags():
  spec, overrides, flags = parse_args(
      ['--config', 'c.py', 'a.png', '--out', 'o', '--skip-bad-images', 'dir', '--config.x=1',
       '--', '--odd.png'], known_flags=('out', 'skip_bad_images'),
      bool_flags=('skip_bad_images',), positional='images')
  assert spec == 'c.py' and overrides == ['--config.x=1']
  assert flags == {'out': 'o', 'skip_bad_images': True, 'images': ['a.png', 'dir', '--odd.png']}
  assert parse_args(['--config', 'c.py', '--skip-bad-images=false'], bool_flags=(
      'skip_bad_images',), positional='images')[2] == {'skip_bad_images': False, 'images': []}
  with pytest.raises(ConfigError, match="takes no value"):
    parse_args(['--config', 'c.py', '--skip-bad-images=maybe'], bool_flags=('skip_bad_images',))
  with pytest.raises(ConfigError, match="unexpected argument 'a.png'"):   # unchanged without it
    parse_args(['--config', 'c.py', 'a.png'])
  # without bool_flags a bare flag still takes the next token as its value (the old behaviour)
  assert parse_args(['--config', 'c.py', '--x', 'y'])[2] == {'x': 'y'}


def test_output_names_keep_jpeg_and_disambiguate():
  assert infer.output_names(['a/x.png', 'b/x.png', 'c/y.JPG', 'd/z.bmp', 'e/x_1.png']) == [
      'x.png', 'x_1.png', 'y.JPG', 'z.png', 'x_1_1.png']


def test_class_names_from_the_config_without_the_dataset(tmp_path):
  from jaxdet.data.categories import COCO80_NAMES, config_categories
  from jaxdet.data.sources import COCO80_IDS
  config = config_cli.load_config(SPEC)
  assert config_categories(config) == (list(shapes.CLASSES), [1, 2, 3, 4, 5])
  coco = config_cli.load_config(SPEC[:-len(':smoke')])      # COCO, no annotation files here
  assert config_categories(coco) == (list(COCO80_NAMES), list(COCO80_IDS))
  ann = tmp_path / 'ann.json'
  ann.write_text(json.dumps(dict(images=[], annotations=[], categories=[
      dict(id=7, name='dog'), dict(id=2, name='cat'), dict(id=9, name='eel')])))
  coco.data.val.ann_file, coco.model.num_classes = str(ann), 3
  assert config_categories(coco) == (['cat', 'dog', 'eel'], [2, 7, 9])   # sorted by id
  coco.model.num_classes = 4
  assert config_categories(coco)[0] == ['class_0', 'class_1', 'class_2', 'class_3']


# ----------------------------------------------------------------------------- API vs evaluation

def test_detector_equals_the_evaluation_path(trained, detector, tmp_path):
  """Detector(score_thr=0) on the val files == what evaluate_loader writes for them (the eval
  loader + pmapped predict_step), detection for detection; the default threshold filters."""
  overrides, work_dir, val_dir = trained
  config = config_cli.load_config(SPEC, overrides)
  from jaxdet.data import loader as data_loader
  from jaxdet.data.sources import build_source
  from jaxdet.engine.steps import AXIS, predict_step
  from jaxdet.engine.train_state import replicate
  from jaxdet.models.detectors import build_detector
  source = build_source(config.data, 'val')
  loader = data_loader.build_eval_loader(config.data, source, num_devices=jax.local_device_count())
  model = build_detector(config.model, config.dtype)
  p_predict = jax.pmap(functools.partial(predict_step, detector=model,
                                         pipeline=config.data.pipeline, dtype=np.float32),
                       axis_name=AXIS)
  variables = ckpt.load_params(os.path.join(work_dir, 'checkpoints'))
  state = replicate(dict(params=variables['params'], batch_stats=variables['batch_stats']))
  evaluation.evaluate_loader(p_predict, state, loader, source, work_dir=str(tmp_path), tag='ref')
  with open(tmp_path / 'detections_ref.json') as f:
    reference = json.load(f)

  files = sorted(os.path.join(val_dir, f) for f in os.listdir(val_dir))
  assert len(files) == 8 and len(reference) > 8
  results = detector(files, score_thr=0.0)
  mine = [d for i, (path, r) in enumerate(zip(files, results))
          for d in infer.to_coco(r, path, i + 1, detector.cat_ids)]
  assert [{k: v for k, v in d.items() if k != 'file_name'} for d in mine] == reference

  default = detector(files)   # score_thr = model.test_cfg.score_thr
  assert detector.score_thr == config.model.test_cfg.score_thr
  for r0, r in zip(results, default):
    keep = r0.scores >= detector.score_thr
    np.testing.assert_array_equal(r.boxes, r0.boxes[keep])
    np.testing.assert_array_equal(r.labels, r0.labels[keep])
    assert r.class_names == [shapes.CLASSES[k] for k in r.labels]
    assert r.boxes.dtype == np.float32 and r.boxes.shape == (len(r), 4)

  single = detector(np.asarray(Image.open(files[3])), score_thr=0.0)   # an array, one image
  assert isinstance(single, Detections) and single.image_size == (64, 64)
  np.testing.assert_array_equal(single.boxes, results[3].boxes)
  np.testing.assert_array_equal(single.scores, results[3].scores)


def test_detector_pads_each_image_as_mmdetection_does(trained, detector):
  """Default (data.test_padding='exact'): each image padded to the multiple of 32 above its
  resized size, batched with images of the same padded shape only; its detections equal those of
  a detector whose one bucket is that shape (the old workaround), whatever the other images."""
  overrides, work_dir, _ = trained
  rng = np.random.default_rng(3)
  sizes = [(30, 64), (64, 24), (50, 50), (20, 70), (30, 64)]   # img_scale (64, 64)
  arrays = [shapes.render_image(rng, 64, labels=[0, 2], clutter=False)[0][:h, :w]
            for h, w in sizes]
  expected = [(32, 64), (64, 32), (64, 64), (32, 64), (32, 64)]   # 64-px fit, ceil to 32
  seen = {}
  for batch in detector.batches(arrays):
    shape = batch['image'].shape[2:4]
    for i in batch['image_id'][batch['image_valid']]:
      seen[int(i)] = shape
  assert [seen[i] for i in range(len(sizes))] == expected
  results = detector(arrays, score_thr=0.0)
  for shape in sorted(set(expected)):
    one_bucket = Detector.from_checkpoint(
        SPEC, work_dir, overrides=overrides + ["--config.data.test_padding=buckets",
                                               f"--config.data.buckets=(({shape[0]},{shape[1]}),)"])
    members = [i for i, s in enumerate(expected) if s == shape]
    for i, r in zip(members, one_bucket([arrays[i] for i in members], score_thr=0.0)):
      assert len(r) > 0
      np.testing.assert_array_equal(r.boxes, results[i].boxes)
      np.testing.assert_array_equal(r.scores, results[i].scores)
      np.testing.assert_array_equal(r.labels, results[i].labels)


# ----------------------------------------------------------------------------- the CLI

def _big_image(path):
  """A 256 px shapes image without clutter (resized to 64 px by the test transform)."""
  image, _, _ = shapes.render_image(np.random.default_rng(7), 256, labels=[0, 1, 4],
                                    clutter=False)
  Image.fromarray(image).save(path)
  return image


def test_cli_draws_returned_boxes_writes_json_and_skips_bad_images(trained, detector, tmp_path,
                                                                  capsys):
  overrides, work_dir, val_dir = trained
  inputs = tmp_path / 'in'
  inputs.mkdir()
  big = _big_image(inputs / 'big.png')
  folder = tmp_path / 'folder'
  shutil.copytree(val_dir, folder)
  (folder / 'notes.txt').write_text('not an image')              # ignored by the folder listing
  truncated = inputs / 'truncated.png'
  truncated.write_bytes((inputs / 'big.png').read_bytes()[:300])  # header fine, pixels missing
  missing = str(inputs / 'missing.png')
  good = [str(inputs / 'big.png')] + sorted(str(folder / f) for f in os.listdir(val_dir))

  reference = detector(good, score_thr=0.0)
  thr = float(np.sort(reference[0].scores)[-3])   # the big image keeps its top-3 boxes
  reference = detector(good, score_thr=thr)
  assert len(reference[0]) >= 3

  out_dir, out_json = tmp_path / 'out', tmp_path / 'json' / 'dets.json'
  argv = ['--config', SPEC, *overrides, '--checkpoint', work_dir, '--out', str(out_dir),
          '--out-json', str(out_json), '--score-thr', repr(thr), '--skip-bad-images',
          str(inputs / 'big.png'), missing, str(truncated), str(folder)]
  code, out, err = _run_cli(argv, capsys)
  assert code == 0, err
  warnings = err.strip().splitlines()
  assert len(warnings) == 2, err
  assert warnings[0] == f'warning: skipping image file not found: {missing}'
  assert warnings[1].startswith('warning: skipping cannot decode image ' + str(truncated))
  assert out.startswith('9 image(s)') and '2 skipped' in out

  # The JSON is the API's result; image ids are positions in the expanded input list.
  with open(out_json) as f:
    dets = json.load(f)
  ids = [1] + list(range(4, 12))   # missing.png and truncated.png keep ids 2 and 3
  expected = [d for path, image_id, r in zip(good, ids, reference)
              for d in infer.to_coco(r, path, image_id, detector.cat_ids)]
  assert dets == expected
  assert {d['category_id'] for d in dets} <= {1, 2, 3, 4, 5}
  assert sorted(os.listdir(out_dir)) == sorted(['big.png'] + os.listdir(val_dir))

  # Drawing: every returned box's outline changed colour; pixels far from all boxes (and from
  # the label tags above them) did not.
  drawn = np.asarray(Image.open(out_dir / 'big.png').convert('RGB'))
  assert drawn.shape == big.shape
  changed = np.any(drawn != big, axis=-1)
  near = np.zeros(changed.shape, bool)
  for box in reference[0].boxes:
    x1, y1, x2, y2 = box_outline(box, big.shape[:2])
    edge = np.concatenate([changed[y1, x1:x2 + 1], changed[y2, x1:x2 + 1],
                           changed[y1:y2 + 1, x1], changed[y1:y2 + 1, x2]])
    assert edge.mean() > 0.95, (box, edge.mean())
    near[max(y1 - 20, 0):y2 + 3, max(x1 - 3, 0):max(x2, x1 + 120) + 3] = True
  assert (~near).sum() > 5000
  assert not changed[~near].any()
  # the folder's images were written too: changed exactly where boxes were returned
  for name, r in zip(sorted(os.listdir(val_dir)), reference[1:]):
    changed = np.any(np.asarray(Image.open(out_dir / name)) != np.asarray(Image.open(folder / name)))
    assert changed == (len(r) > 0), (name, len(r))


def test_cli_bad_inputs_are_one_line_errors(trained, tmp_path, capsys):
  overrides, work_dir, val_dir = trained
  image = os.path.join(val_dir, '000000.png')
  base = ['--config', SPEC, *overrides, '--out', str(tmp_path / 'out')]

  missing = str(tmp_path / 'missing.png')
  code, _, err = _run_cli(base + ['--checkpoint', work_dir, image, missing], capsys)
  assert (code, err) == (2, f'error: image file not found: {missing}\n')

  (tmp_path / 'empty').mkdir()
  code, _, err = _run_cli(base + ['--checkpoint', work_dir, str(tmp_path / 'empty')], capsys)
  assert (code, err) == (2, f'error: no PNG / JPEG files in folder {tmp_path / "empty"}\n')

  code, _, err = _run_cli(base + ['--checkpoint', work_dir, '--score-thr', 'high', image], capsys)
  assert (code, err) == (2, "error: --score-thr expects a number, got 'high'\n")

  code, _, err = _run_cli(['--config', SPEC, '--checkpoint', work_dir, '--out', val_dir, image],
                          capsys)   # drawing over the inputs
  assert (code, err) == (2, f'error: --out {val_dir} would overwrite the input image {image}; '
                            'choose another output folder\n')

  bad = str(tmp_path / 'nope')
  code, _, err = _run_cli(base + ['--checkpoint', bad, image], capsys)
  assert code == 2 and err.count('\n') == 1
  assert err.startswith(f"error: checkpoint not found: '{bad}'")

  code, _, err = _run_cli(base + ['--checkpoint', str(tmp_path), image], capsys)  # no checkpoint
  assert (code, err) == (2, f'error: no complete checkpoint in {tmp_path} '
                            f'(from {str(tmp_path)!r})\n')

  code, _, err = _run_cli(base + ['--checkpoint', work_dir, '--config.model.num_classes=3',
                                  image], capsys)
  assert code == 2 and err.count('\n') == 1
  assert f'error: checkpoint {work_dir}/checkpoints/{STEPS} does not fit the config: ' in err
  assert 'params/head/conv_cls/kernel (3, 3, 64, 5) -> (3, 3, 64, 3)' in err

  truncated = tmp_path / 'truncated.png'
  truncated.write_bytes(open(image, 'rb').read()[:200])
  code, _, err = _run_cli(base + ['--checkpoint', work_dir, image, str(truncated)], capsys)
  assert code == 2 and err.startswith(f'error: cannot decode image {truncated}')
  assert err.count('\n') == 1


# ----------------------------------------------------------------------------- load_from

def test_merge_variables_is_pure_and_names_what_it_reinitialises():
  init = {'params': {'a': np.zeros(3, np.float32), 'cls': {'kernel': np.zeros((2, 3))},
                     'new': np.ones(2)},
          'batch_stats': {}}
  loaded = {'params': {'a': np.arange(3.0), 'cls': {'kernel': np.ones((2, 5))},
                       'old': np.ones(4)}}
  merged, diff = ckpt.merge_variables(init, loaded)
  assert diff == dict(shape=[('params/cls/kernel', (2, 5), (2, 3))], missing=['params/new'],
                      unexpected=['params/old'])
  np.testing.assert_array_equal(merged['params']['a'], [0., 1., 2.])
  assert merged['params']['a'].dtype == np.float32   # cast to the model's dtype
  np.testing.assert_array_equal(merged['params']['cls']['kernel'], np.zeros((2, 3)))
  np.testing.assert_array_equal(merged['params']['new'], np.ones(2))
  assert merged['batch_stats'] == {} and 'old' not in merged['params']
  np.testing.assert_array_equal(init['params']['a'], np.zeros(3))   # inputs untouched


class _Lines(logging.Handler):
  def __init__(self):
    super().__init__()
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


def test_load_from_a_5_class_checkpoint_into_3_classes(trained, tmp_path):
  """Exactly the class-dependent leaves (head/conv_cls) keep the fresh initialisation; every
  other tensor is the checkpoint's, bit for bit; step 0 and a fresh optimizer state."""
  overrides, work_dir, _ = trained
  config = config_cli.load_config(SPEC, overrides + ['--config.model.num_classes=3'])
  from jaxdet.engine.optimizer import build_optimizer
  from jaxdet.engine.train_state import frozen_mask
  from jaxdet.models.detectors import build_detector
  model = build_detector(config.model, config.dtype)
  # A "fresh" 3-class state as create_train_state makes it, with random values (no compile).
  abstract = jax.eval_shape(model.module.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32))
  rng = np.random.default_rng(0)
  init = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), abstract)
  tx = build_optimizer(config.optimizer, lambda step: 0.01, init['params'],
                       frozen_mask(init['params'], config.model))
  fresh = dict(step=np.full((), 7, np.int32), params=init['params'],
               batch_stats=init['batch_stats'], opt_state=tx.init(init['params']))
  lines, logger = _Lines(), logging.getLogger('jaxdet.train')
  logger.addHandler(lines)
  logger.setLevel(logging.INFO)
  try:
    state = train_lib.load_from(fresh, tx, work_dir)
  finally:
    logger.removeHandler(lines)
  source = ckpt.load_params(os.path.join(work_dir, 'checkpoints'))
  fresh_flat = ckpt._flat({'params': fresh['params'], 'batch_stats': fresh['batch_stats']})
  state_flat = ckpt._flat({'params': state['params'], 'batch_stats': state['batch_stats']})
  source_flat = ckpt._flat(source)
  assert sorted(state_flat) == sorted(source_flat) == sorted(fresh_flat)
  reinit = sorted(k for k in state_flat if np.shape(source_flat[k]) != np.shape(state_flat[k]))
  assert reinit == ['params/head/conv_cls/bias', 'params/head/conv_cls/kernel']
  for key, value in state_flat.items():
    expected = fresh_flat[key] if key in reinit else source_flat[key]
    assert np.asarray(value).dtype == np.asarray(expected).dtype
    assert np.asarray(value).tobytes() == np.asarray(expected).tobytes(), key
  assert int(state['step']) == 0
  for leaf in jax.tree_util.tree_leaves(state['opt_state']):   # SGD momentum traces: zeros
    assert not np.any(np.asarray(leaf))
  (line,) = [m for m in lines.lines if 'load_from' in m]
  total = len(state_flat)
  assert line.startswith(f'load_from {work_dir}/checkpoints/{STEPS}: {total - 2} of {total} '
                         'tensors loaded; kept the fresh initialisation')
  assert 'params/head/conv_cls/bias (5,) -> (3,)' in line
  assert 'params/head/conv_cls/kernel (3, 3, 64, 5) -> (3, 3, 64, 3)' in line
  with pytest.raises(ValueError, match=r"^config\.load_from: checkpoint not found: '.*nope'"):
    train_lib.load_from(fresh, tx, str(tmp_path / 'nope'))


def test_load_from_in_the_train_loop_then_resume_wins(trained, tmp_path):
  overrides, work_dir, _ = trained
  run = str(tmp_path / 'finetune')

  def train(steps):
    config = config_cli.load_config(SPEC, overrides + [f'--config.max_steps={steps}',
                                                       f'--config.load_from={work_dir}'])
    train_lib.train_and_evaluate(config, run)
    with open(os.path.join(run, 'train.log')) as f:
      return f.read()

  log_text = train(1)
  assert f'load_from {work_dir}/checkpoints/{STEPS}: ' in log_text
  assert 'tensors loaded' in log_text and 'fresh initialisation' not in log_text
  with open(os.path.join(run, 'metrics.jsonl')) as f:
    steps = [json.loads(line)['step'] for line in f if '"train"' in line]
  assert steps == [1]   # from step 0, not the checkpoint's step
  log_text = train(2)   # the work_dir has a checkpoint now: resume, load_from ignored
  assert re.search(r'resumed from step 1 \(epoch \d+, iteration \d+ of it\) '
                   r'\(config.load_from is ignored when resuming\)', log_text)
