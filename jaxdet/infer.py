"""Detect objects in your images with a trained checkpoint; draw them and/or write COCO JSON.

  python -m jaxdet.infer --config configs/atss.py:smoke --checkpoint work_dirs/atss_smoke \
      --out OUTDIR [--score-thr 0.3] [--out-json F] [--batch-size N] [--skip-bad-images] \
      [--config.KEY=VALUE ...] IMAGES_OR_FOLDERS...

Inputs: image files (anything Pillow reads) and folders (their PNG / JPEG files, sorted by
name, not recursive), in the order given. `--checkpoint`: a run's work_dir (latest
checkpoint), its `checkpoints` folder or one step folder. Each image is written to
`OUTDIR/<its file name>` with every detection scoring >= `--score-thr` (default 0.3) outlined
in its class's colour and tagged '<class> <score>'; JPEG inputs stay JPEG, others become PNG;
a name that two inputs share gets a '_1', '_2', ... suffix.

`--out-json F`: a COCO-style list of detections, one dict per box:
  {"file_name": the input path as given (folder + name for folder inputs),
   "image_id": the image's 1-based position in the expanded input list (skipped images keep
               their number, so ids never shift),
   "category_id": the label's dataset category id (the ids the training run saved in its
               checkpoint; else shapes: label + 1, COCO: the official ids; see
               jaxdet.data.categories),
   "bbox": [x, y, w, h] in original pixels, "score": float}
(at least one of --out / --out-json is needed).

A missing or unreadable image is a one-line error naming it; with `--skip-bad-images` it is
skipped with a warning line instead. A bad checkpoint path, or a checkpoint that does not fit
the config (e.g. another model.num_classes), is a one-line error. `--batch-size`: images per
device per batch (default data.val.samples_per_gpu); images are bucketed and batched as in
evaluation, one compilation per bucket shape.
"""
import json
import os
import sys

from PIL import Image

from jaxdet.data.sources import DataError
from jaxdet.engine import config_cli
from jaxdet.engine.xla_cpu_flags import set_xla_cpu_flags

FLAGS = ('checkpoint', 'out', 'out_json', 'score_thr', 'batch_size', 'skip_bad_images')
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg')


def expand_inputs(items):
  """Files as given and folders expanded to their sorted PNG / JPEG files; a missing path or a
  folder without images is a one-line DataError naming it."""
  paths = []
  for item in items:
    if os.path.isdir(item):
      found = sorted(os.path.join(item, f) for f in os.listdir(item)
                     if f.lower().endswith(IMAGE_SUFFIXES)
                     and os.path.isfile(os.path.join(item, f)))
      if not found:
        raise DataError(f'no PNG / JPEG files in folder {item}')
      paths.extend(found)
    else:
      paths.append(item)
  return paths


def output_names(paths):
  """OUTDIR file names for `paths`: the base name (JPEG stays JPEG, others -> .png), with a
  '_1', '_2', ... suffix where two inputs share a name."""
  names, used = [], set()
  for path in paths:
    stem, ext = os.path.splitext(os.path.basename(path))
    ext = ext if ext.lower() in ('.jpg', '.jpeg', '.png') else '.png'
    name, k = stem + ext, 0
    while name.lower() in used:
      k += 1
      name = f'{stem}_{k}{ext}'
    used.add(name.lower())
    names.append(name)
  return names


def to_coco(detections, file_name, image_id, cat_ids):
  """A `Detections` -> COCO-style dicts (see the module docstring)."""
  return [dict(file_name=file_name, image_id=int(image_id),
               category_id=int(cat_ids[int(label)]),
               bbox=[float(x1), float(y1), float(x2 - x1), float(y2 - y1)], score=float(score))
          for (x1, y1, x2, y2), score, label in zip(detections.boxes.tolist(),
                                                    detections.scores.tolist(),
                                                    detections.labels.tolist())]


def _number(flags, name, kind, default):
  value = flags.get(name)
  if value is None:
    return default
  try:
    return kind(value)
  except (TypeError, ValueError):
    what = 'an integer' if kind is int else 'a number'
    raise ValueError(f'--{name.replace("_", "-")} expects {what}, got {value!r}') from None


def _warn(message):
  print(f'warning: {message}', file=sys.stderr, flush=True)


def _check_readable(path, skip):
  """False (after a warning) or a DataError for a missing / non-image file; cheap (header only)."""
  try:
    if not os.path.isfile(path):
      raise DataError(f'image file not found: {path}')
    with Image.open(path):
      pass
    return True
  except (DataError, OSError) as e:
    error = e if isinstance(e, DataError) else DataError(
        f'not a readable image (corrupt or unknown format): {path}')
    if not skip:
      raise error from None
    _warn(f'skipping {error}')
    return False


USAGE = config_cli.Usage(
    command='python -m jaxdet.infer',
    summary='Detect objects in your images with a trained checkpoint; draw them and/or write '
            'COCO-style JSON.',
    flags=(('--checkpoint DIR', "a run's work_dir, its checkpoints folder or a step folder", True),
           ('--out OUTDIR', 'write each image with its detections drawn here'),
           ('--out-json FILE', 'write the detections as COCO-style JSON (--out and/or this)'),
           ('--score-thr T', 'keep detections scoring >= T (default 0.3)'),
           ('--batch-size N', 'images per device per batch (default: data.val.samples_per_gpu)'),
           ('--skip-bad-images', 'skip missing or unreadable images with a warning')),
    positional='IMAGES_OR_FOLDERS...',
    more='python -m pydoc jaxdet.infer (file names, JSON fields); README.md '
         '"Inference and fine-tuning".')


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  spec, overrides, flags = config_cli.parse_args(argv, known_flags=FLAGS,
                                                 bool_flags=('skip_bad_images',),
                                                 positional='images', usage=USAGE)
  for flag in ('checkpoint',):
    if not flags.get(flag) or flags[flag] is True:
      raise ValueError(f'--{flag} DIR is required (a work_dir, its checkpoints folder or a step '
                       'folder)')
  out_dir, out_json = flags.get('out'), flags.get('out_json')
  if out_dir is True or out_json is True or not (out_dir or out_json):
    raise ValueError('give --out OUTDIR (drawn images) and/or --out-json FILE')
  if not flags['images']:
    raise ValueError('no images given (list image files and/or folders after the flags)')
  score_thr = _number(flags, 'score_thr', float, 0.3)
  batch_size = _number(flags, 'batch_size', int, None)
  skip = bool(flags.get('skip_bad_images', False))

  paths = expand_inputs(flags['images'])
  names = output_names(paths)
  if out_dir:
    inputs = {os.path.abspath(p) for p in paths}
    clash = [p for p, n in zip(paths, names) if os.path.abspath(os.path.join(out_dir, n)) in inputs]
    if clash:
      raise ValueError(f'--out {out_dir} would overwrite the input image {clash[0]}; choose '
                       'another output folder')
  readable = [_check_readable(p, skip) for p in paths]   # before the model: fail fast
  config = config_cli.load_config(spec, overrides)
  set_xla_cpu_flags(config)  # before JAX starts its backends
  # pylint: disable-next=import-outside-toplevel
  from jaxdet.inference import Detector, as_rgb_array, draw_detections
  detector = Detector.from_checkpoint(config, flags['checkpoint'], score_thr=score_thr,
                                      batch_size=batch_size)
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
  chunk = max(detector.batch_size * detector.num_devices * 4, 16)
  todo = [i for i, ok in enumerate(readable) if ok]
  coco, done, boxes = [], 0, 0
  for start in range(0, len(todo), chunk):
    indices, images = [], []
    for i in todo[start:start + chunk]:
      try:
        images.append(as_rgb_array(paths[i]))
        indices.append(i)
      except DataError as e:
        if not skip:
          raise
        _warn(f'skipping {e}')
    for i, image, result in zip(indices, images, detector.predict_arrays(images)):
      coco += to_coco(result, paths[i], i + 1, detector.cat_ids)
      boxes += len(result)
      done += 1
      if out_dir:
        drawn = draw_detections(image, result)
        target = os.path.join(out_dir, names[i])
        if names[i].lower().endswith(('.jpg', '.jpeg')):
          drawn.save(target, quality=95)
        else:
          drawn.save(target)
  if out_json:
    directory = os.path.dirname(os.path.abspath(out_json))
    os.makedirs(directory, exist_ok=True)
    with open(out_json, 'w') as f:
      json.dump(coco, f)
  skipped = len(paths) - done
  print(f'{done} image(s), {boxes} detection(s) with score >= {score_thr:g}'
        + (f', {skipped} skipped' if skipped else '')
        + (f'; drawn into {out_dir}' if out_dir else '')
        + (f'; JSON {out_json}' if out_json else ''))
  return 0


if __name__ == '__main__':
  config_cli.main_error_exit(main)
