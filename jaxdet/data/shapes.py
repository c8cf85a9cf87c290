"""The built-in detection dataset: coloured shapes on cluttered backgrounds.

Every test and the README quick start train on it, so nothing is downloaded. Five classes
(``CLASSES``): filled or outlined squares, filled circles, filled or outlined triangles
(pointing up, down, left or right), plus-shaped crosses and rings. Sizes are drawn
log-uniformly from 8 px to 0.6 x the image side, so at 192 px about half the objects are
COCO-small (< 32^2 px), most of the rest medium and a few large: APs, APm and APl all mean
something. Objects may overlap, but a new object is rejected when it would hide more than
40% of an earlier one, so every label stays honest. Backgrounds are linear gradients
between two muted colours, crossed by random lines; random noise covers everything.
Object colours are saturated and kept far from the background's.

A box is the tight bound of the object's *visible* pixels, ``(x1, y1, x2, y2)`` with
``x2 = last column + 1``, so a lone shape's box is exactly the extent of its drawn pixels.

Determinism: image ``i`` of split ``s`` is drawn from ``numpy.random.default_rng([seed,
s, i])`` alone, so the bytes never depend on the number of workers or the order of
generation (PIL draws without anti-aliasing; PNG encoding is deterministic).

As a COCO folder (``write_coco``, the CLI, and the cache used by ``data.source='shapes'``)::

  DIR/annotations/instances_train.json   DIR/train/000000.png ...
  DIR/annotations/instances_val.json     DIR/val/000000.png ...

Image ids are ``index + 1`` and category ids ``label + 1``.

CLI::

  python -m jaxdet.data.shapes --out DIR --num-train 2000 --num-val 200 --size 192 [--seed 0]
"""
import argparse
import colorsys
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ('square', 'circle', 'triangle', 'cross', 'ring')
SPLITS = {'train': 0, 'val': 1}
# Bump when the drawing changes: it is part of the cache key, so old caches are not reused.
GENERATOR_VERSION = 1

MIN_SIZE = 8            # px, smallest object side
MAX_SIZE_FRAC = 0.6     # largest object side as a fraction of the image side
MAX_HIDDEN_FRAC = 0.4   # an object may lose at most this fraction of its pixels to later ones
MAX_OBJECTS = 6         # objects per image are uniform in 1..MAX_OBJECTS (mean 3.5)


def _colour(rng, saturation, value):
  """An RGB colour (3,) float in 0..255 from a random hue and the given S, V ranges."""
  r, g, b = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(*saturation), rng.uniform(*value))
  return np.array([r, g, b]) * 255.0


def _background(rng, size):
  """(size, size, 3) uint8 gradient between two muted colours, and the two colours."""
  dark = rng.uniform() < 0.5
  value = (0.1, 0.45) if dark else (0.55, 0.9)
  c0 = _colour(rng, (0.0, 0.35), value)
  c1 = _colour(rng, (0.0, 0.35), value)
  angle = rng.uniform(0, 2 * np.pi)
  ramp = np.arange(size, dtype=np.float32)
  t = ramp[None, :] * np.float32(np.cos(angle)) + ramp[:, None] * np.float32(np.sin(angle))
  t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
  image = c0.astype(np.float32) + (c1 - c0).astype(np.float32) * t[..., None]
  return np.round(image).astype(np.uint8), (c0, c1)


def _object_colour(rng, background_colours):
  """A saturated colour at L1 distance >= 150 from both background colours (best of 30)."""
  best, best_dist = None, -1.0
  for _ in range(30):
    c = _colour(rng, (0.6, 1.0), (0.6, 1.0))
    dist = min(np.abs(c - b).sum() for b in background_colours)
    if dist > best_dist:
      best, best_dist = c, dist
    if dist >= 150:
      break
  return best


def _draw_mask(rng, label, side):
  """Draws shape ``label`` filling a ``side`` x ``side`` square; (side, side) bool mask."""
  mask = Image.new('L', (side, side), 0)
  draw = ImageDraw.Draw(mask)
  x0, y0 = 0, 0
  x1, y1 = side - 1, side - 1   # PIL's rectangle/ellipse bounds are inclusive
  outlined = side >= 16 and rng.uniform() < 0.5
  width = max(2, int(round(side * rng.uniform(0.08, 0.15))))
  name = CLASSES[label]
  if name == 'square':
    draw.rectangle([x0, y0, x1, y1], fill=None if outlined else 255, outline=255,
                   width=width if outlined else 1)
  elif name == 'circle':
    draw.ellipse([x0, y0, x1, y1], fill=255)
  elif name == 'triangle':
    direction = rng.integers(4)
    corners = {0: [(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)],     # pointing up
               1: [(x0, y0), (x1, y0), ((x0 + x1) / 2, y1)],     # down
               2: [(x1, y0), (x1, y1), (x0, (y0 + y1) / 2)],     # left
               3: [(x0, y0), (x0, y1), (x1, (y0 + y1) / 2)]}[int(direction)]
    if outlined:
      draw.polygon(corners, fill=None, outline=255, width=width)
    else:
      draw.polygon(corners, fill=255, outline=255)
  elif name == 'cross':
    arm = max(2, int(round(side * rng.uniform(0.25, 0.4))))
    a0 = x0 + (side - arm) // 2
    b0 = y0 + (side - arm) // 2
    draw.rectangle([a0, y0, a0 + arm - 1, y1], fill=255)
    draw.rectangle([x0, b0, x1, b0 + arm - 1], fill=255)
  else:  # ring
    ring_width = max(2, int(round(side * rng.uniform(0.12, 0.22))))
    draw.ellipse([x0, y0, x1, y1], fill=None, outline=255, width=ring_width)
  return np.asarray(mask) > 0


def render_image(rng, size, *, labels=None, clutter=True):
  """Draws one image.

  Args:
    rng: a ``numpy.random.Generator``; the only source of randomness.
    size: image side in pixels (square images).
    labels: optional sequence of class indices to place (default: 1..MAX_OBJECTS random
      classes). An object that finds no place after 30 tries is left out.
    clutter: False gives a flat background without lines or noise (for tests).

  Returns:
    image: (size, size, 3) uint8 RGB.
    boxes: (n, 4) float32 xyxy pixels, tight bounds of each object's visible pixels.
    labels: (n,) int32 in 0..len(CLASSES)-1.
  """
  if clutter:
    image, bg_colours = _background(rng, size)
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(2, 7)):
      p = rng.uniform(0, size, 4)
      colour = tuple(int(v) for v in _colour(rng, (0.0, 1.0), (0.2, 1.0)))
      draw.line([(p[0], p[1]), (p[2], p[3])], fill=colour, width=int(rng.integers(1, 3)))
    image = np.array(canvas)
  else:
    c0 = _colour(rng, (0.0, 0.35), (0.1, 0.45))
    image = np.empty((size, size, 3), np.uint8)
    image[:] = np.round(c0).astype(np.uint8)
    bg_colours = (c0,)
  if labels is None:
    labels = rng.integers(len(CLASSES), size=rng.integers(1, MAX_OBJECTS + 1))
  owner = np.full((size, size), -1, np.int32)   # which object each pixel shows
  visible = []   # visible pixel count of each kept object
  full_area = []
  kept = []
  max_side = max(MIN_SIZE, int(size * MAX_SIZE_FRAC))
  for label in labels:
    for _ in range(30):
      side = int(round(np.exp(rng.uniform(np.log(MIN_SIZE), np.log(max_side)))))
      x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
      mask = _draw_mask(rng, int(label), side)
      patch = owner[y0:y0 + side, x0:x0 + side]
      covered = patch[mask]
      hidden = np.bincount(covered[covered >= 0], minlength=len(kept))
      if all(visible[j] - hidden[j] >= (1 - MAX_HIDDEN_FRAC) * full_area[j]
             for j in range(len(kept))):
        break
    else:
      continue
    for j in range(len(kept)):
      visible[j] -= int(hidden[j])
    patch[mask] = len(kept)
    area = int(mask.sum())
    visible.append(area)
    full_area.append(area)
    kept.append(int(label))
    colour = np.round(_object_colour(rng, bg_colours)).astype(np.uint8)
    image[y0:y0 + side, x0:x0 + side][mask] = colour
  if clutter:
    # Triangular noise (sum of two uniforms) in [-amplitude, amplitude]: cheaper than normal.
    amplitude = np.float32(rng.uniform(0.0, 16.0))
    noise = rng.random(image.shape, dtype=np.float32) + rng.random(image.shape, dtype=np.float32)
    noise = (noise - np.float32(1.0)) * amplitude + image
    image = np.clip(np.rint(noise, out=noise), 0, 255, out=noise).astype(np.uint8)
  boxes = np.zeros((len(kept), 4), np.float32)
  for j in range(len(kept)):
    ys, xs = np.nonzero(owner == j)
    boxes[j] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
  return image, boxes, np.asarray(kept, np.int32)


def sample(seed, split, index, size):
  """Image ``index`` of ``split`` ('train' or 'val'): ``render_image`` with its own rng."""
  rng = np.random.default_rng([seed, SPLITS[split], index])
  return render_image(rng, size)


def _coco_json(split, records, size, params):
  images, annotations = [], []
  for index, (boxes, labels) in enumerate(records):
    images.append(dict(id=index + 1, file_name=f'{index:06d}.png', width=size, height=size))
    for box, label in zip(boxes.tolist(), labels.tolist()):
      w, h = box[2] - box[0], box[3] - box[1]
      annotations.append(dict(id=len(annotations) + 1, image_id=index + 1,
                              category_id=label + 1, bbox=[box[0], box[1], w, h],
                              area=w * h, iscrowd=0))
  categories = [dict(id=k + 1, name=name, supercategory='shape')
                for k, name in enumerate(CLASSES)]
  info = dict(description=f'jaxdet shapes ({split})', **params)
  return dict(info=info, licenses=[], images=images, annotations=annotations,
              categories=categories)


def _write_images(root, split, start, stop, size, seed):
  """Renders images ``start..stop-1`` of ``split`` as PNGs; their (boxes, labels)."""
  records = []
  for index in range(start, stop):
    image, boxes, labels = sample(seed, split, index, size)
    # compress_level=1: 2x faster than the default and only ~10% larger on noisy images.
    Image.fromarray(image).save(os.path.join(root, split, f'{index:06d}.png'), compress_level=1)
    records.append((boxes, labels))
  return records


def _render_in_subprocesses(root, jobs, size, seed, workers):
  """Runs ``_write_images`` for ``jobs`` in ``workers`` fresh interpreters; their records.

  Fresh ``python -m jaxdet.data.shapes`` processes rather than multiprocessing: forking a
  process that runs JAX threads is unsafe, and spawn re-imports the caller's main script.
  """
  package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(p for p in (package_parent, env.get('PYTHONPATH')) if p)
  groups = [jobs[w::workers] for w in range(workers)]
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'jaxdet.data.shapes', '--worker-jobs',
       json.dumps(dict(root=root, size=size, seed=seed, jobs=group))],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) for group in groups if group]
  outputs = [proc.communicate() for proc in procs]
  results = {}
  for proc, group, (out, err) in zip(procs, groups, outputs):
    if proc.returncode != 0:
      raise RuntimeError('shapes worker failed: ' + err.decode(errors='replace')[-2000:])
    for job, records in zip(group, json.loads(out)):
      results[tuple(job)] = [(np.asarray(b, np.float32).reshape(-1, 4), np.asarray(l, np.int32))
                             for b, l in records]
  return [results[tuple(job)] for job in jobs]


def _write_splits(root, *, num_train, num_val, size, seed, workers=None):
  """Writes the COCO folder layout under ``root`` (which must exist).

  ``workers`` > 1 (default: up to 8 CPUs when there are >= 500 images) renders chunks of
  images in that many subprocesses; every image has its own rng, so the bytes are the same.
  """
  params = dict(seed=seed, size=size, num_train=num_train, num_val=num_val,
                generator_version=GENERATOR_VERSION)
  if workers is None:
    workers = min(os.cpu_count() or 1, 8) if num_train + num_val >= 500 else 1
  os.makedirs(os.path.join(root, 'annotations'))
  for split in ('train', 'val'):
    os.makedirs(os.path.join(root, split))
  chunk = 50
  jobs = [[split, start, min(start + chunk, count)]
          for split, count in (('train', num_train), ('val', num_val))
          for start in range(0, count, chunk)]
  if workers > 1:
    results = _render_in_subprocesses(root, jobs, size, seed, workers)
  else:
    results = [_write_images(root, sp, a, b, size, seed) for sp, a, b in jobs]
  for split in ('train', 'val'):
    records = [r for (sp, _, _), rs in zip(jobs, results) if sp == split for r in rs]
    with open(ann_file(root, split), 'w') as f:
      json.dump(_coco_json(split, records, size, params), f)


def _check_params(num_train, num_val, size, seed):
  for name, value, low in (('num_train', num_train, 1), ('num_val', num_val, 1),
                           ('size', size, 2 * MIN_SIZE), ('seed', seed, 0)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
      raise ValueError(f'shapes dataset: {name}={value!r} must be an integer >= {low}')


def write_coco(out, *, num_train, num_val, size=192, seed=0, workers=None):
  """Writes the dataset as a COCO folder at ``out`` atomically (temp dir, then rename).

  ``out`` must not exist or be an empty directory; nothing is left half-written.
  """
  _check_params(num_train, num_val, size, seed)
  out = os.path.abspath(out)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise ValueError(f'--out {out} already exists and is not an empty directory')
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.shapes-tmp-', dir=parent)
  try:
    _write_splits(tmp, num_train=num_train, num_val=num_val, size=size, seed=seed,
                  workers=workers)
    os.chmod(tmp, 0o755)
    os.replace(tmp, out)   # an existing empty directory is replaced atomically
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def default_cache_dir():
  """``$XDG_CACHE_HOME/jaxdet`` or ``~/.cache/jaxdet``."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'jaxdet')


def ensure_dataset(*, num_train, num_val, size=192, seed=0, cache_dir=None):
  """Returns the folder of the dataset with these parameters, generating it on first use.

  The folder is ``<cache_dir>/shapes-<hash of the parameters and GENERATOR_VERSION>``.
  Concurrent callers (several hosts or processes) each write a temp folder; the first
  rename wins and the others discard theirs.
  """
  _check_params(num_train, num_val, size, seed)
  cache_dir = cache_dir or default_cache_dir()
  key = json.dumps(dict(num_train=int(num_train), num_val=int(num_val), size=int(size),
                        seed=int(seed), version=GENERATOR_VERSION), sort_keys=True)
  root = os.path.join(cache_dir, 'shapes-' + hashlib.sha256(key.encode()).hexdigest()[:12])
  if os.path.isdir(root):
    return root
  os.makedirs(cache_dir, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.shapes-tmp-', dir=cache_dir)
  try:
    _write_splits(tmp, num_train=int(num_train), num_val=int(num_val), size=int(size),
                  seed=int(seed))
    os.chmod(tmp, 0o755)
    try:
      os.rename(tmp, root)
    except OSError:
      if not os.path.isdir(root):
        raise
      shutil.rmtree(tmp, ignore_errors=True)   # another process finished first
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return root


def ann_file(root, split):
  """Path of the COCO annotation file of ``split`` in a shapes folder."""
  return os.path.join(root, 'annotations', f'instances_{split}.json')


def img_dir(root, split):
  """Path of the image folder of ``split`` in a shapes folder."""
  return os.path.join(root, split)


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog='python -m jaxdet.data.shapes',
      usage='%(prog)s --out DIR [--num-train N] [--num-val N] [--size PX] [--seed S] '
            '[--workers N]',
      description='Write the built-in shapes detection dataset as a COCO folder.',
      epilog="more: python -m pydoc jaxdet.data.shapes (the classes, the folder layout); "
             "training uses it through data.source='shapes' (configs/_base_/smoke.py).")
  parser.add_argument('--out', metavar='DIR',
                      help='output folder (must not exist or be empty) (required)')
  parser.add_argument('--num-train', type=int, default=2000, metavar='N',
                      help='training images (default 2000)')
  parser.add_argument('--num-val', type=int, default=200, metavar='N',
                      help='validation images (default 200)')
  parser.add_argument('--size', type=int, default=192, metavar='PX',
                      help='image side in pixels (default 192)')
  parser.add_argument('--seed', type=int, default=0, metavar='S',
                      help='image i of a split depends only on (seed, split, i) (default 0)')
  parser.add_argument('--workers', type=int, default=None,
                      help='rendering processes (default: CPU count, up to 8)')
  parser.add_argument('--worker-jobs', help=argparse.SUPPRESS)   # internal: one subprocess
  args = parser.parse_args(argv)
  if args.worker_jobs:
    spec = json.loads(args.worker_jobs)
    results = [_write_images(spec['root'], split, start, stop, spec['size'], spec['seed'])
               for split, start, stop in spec['jobs']]
    json.dump([[(b.tolist(), l.tolist()) for b, l in records] for records in results],
              sys.stdout)
    return 0
  if not args.out:
    parser.error('the following arguments are required: --out')
  try:
    out = write_coco(args.out, num_train=args.num_train, num_val=args.num_val,
                     size=args.size, seed=args.seed, workers=args.workers)
  except ValueError as e:
    parser.exit(2, f'error: {e}\n')
  print(f'wrote {args.num_train} train + {args.num_val} val images of {args.size}x{args.size} '
        f'to {out} ({ann_file(out, "train")}, {ann_file(out, "val")})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
