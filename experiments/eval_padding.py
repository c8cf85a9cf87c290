"""Test-time padding (issue 15): mAP and evaluation time with exact padding vs buckets.

The shapes val images are all 160 x 160, which fill their bucket either way, so this makes a
non-square copy of the val split: each image cropped to one side 160 px and the other uniform in
[80, 160] (a random offset; half of them portrait); a box keeps its clipped part, and a box with
less than half of its area left becomes a crowd box (ignored by pycocotools, neither a miss nor
a false positive). Then it evaluates a checkpoint on it with `python -m jaxdet.evaluate`, once
per mode, each in a fresh process and timed from the command's start (compilation included);
'exact' runs twice, the second with the persistent compilation cache the first filled.

  python experiments/eval_padding.py --config configs/atss.py:smoke --checkpoint WORK_DIR \
      [--out /tmp/eval_padding] [--seed 0]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_crops(src_ann, src_dir, out, seed=0):
  """A COCO folder under `out` with every image of `src_ann` cropped (see the docstring)."""
  rng = np.random.default_rng(seed)
  data = json.load(open(src_ann))
  anns = {}
  for a in data['annotations']:
    anns.setdefault(a['image_id'], []).append(a)
  os.makedirs(os.path.join(out, 'val'), exist_ok=True)
  images, annotations = [], []
  for img in data['images']:
    h, w = img['height'], img['width']
    short = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
    ch, cw = (short, w) if rng.random() < 0.5 else (h, short)
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    pixels = np.asarray(Image.open(os.path.join(src_dir, img['file_name'])).convert('RGB'))
    Image.fromarray(pixels[y0:y0 + ch, x0:x0 + cw]).save(os.path.join(out, 'val', img['file_name']))
    images.append(dict(img, height=ch, width=cw))
    for a in anns.get(img['id'], []):
      x, y, bw, bh = a['bbox']
      x1, y1 = max(x - x0, 0), max(y - y0, 0)
      x2, y2 = min(x + bw - x0, cw), min(y + bh - y0, ch)
      if x2 - x1 < 1 or y2 - y1 < 1:
        continue
      kept = (x2 - x1) * (y2 - y1) / max(bw * bh, 1e-6)
      annotations.append(dict(a, bbox=[x1, y1, x2 - x1, y2 - y1], area=(x2 - x1) * (y2 - y1),
                              iscrowd=int(a.get('iscrowd', 0) or kept < 0.5)))
  ann_file = os.path.join(out, 'instances_val.json')
  json.dump(dict(images=images, annotations=annotations, categories=data['categories']),
            open(ann_file, 'w'))
  return ann_file, os.path.join(out, 'val')


def evaluate(config, checkpoint, ann_file, img_dir, padding, cache_dir):
  metrics_file = os.path.join(os.path.dirname(img_dir), f'metrics_{padding}.json')
  cmd = [sys.executable, '-m', 'jaxdet.evaluate', '--config', config, '--checkpoint', checkpoint,
         '--config.data.source=coco', f'--config.data.val.ann_file={ann_file}',
         f'--config.data.val.img_dir={img_dir}', f'--config.data.test_padding={padding}',
         '--out', metrics_file]
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAXDET_COMPILATION_CACHE=cache_dir)
  start = time.time()
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  seconds = time.time() - start
  if proc.returncode:
    raise SystemExit(f'{" ".join(cmd)} failed:\n{proc.stderr[-3000:]}')
  with open(metrics_file) as f:
    metrics = json.load(f)
  shapes = [line for line in (proc.stdout + proc.stderr).splitlines() if 'image shape(s)' in line]
  return dict(padding=padding, seconds=round(seconds, 1),
              **{k: round(v, 4) for k, v in metrics.items()},
              shapes=shapes[-1].split(' - ')[-1] if shapes else '')


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--config', required=True)
  parser.add_argument('--checkpoint', required=True)
  parser.add_argument('--out', default=None)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  sys.path.insert(0, ROOT)
  from jaxdet.data import shapes  # pylint: disable=import-outside-toplevel
  root = shapes.ensure_dataset(num_train=2000, num_val=200, size=160, seed=0)
  out = args.out or tempfile.mkdtemp(prefix='eval_padding_')
  ann_file, img_dir = make_crops(shapes.ann_file(root, 'val'), shapes.img_dir(root, 'val'),
                                 out, args.seed)
  cache = os.path.join(out, 'xla_cache')
  shutil.rmtree(cache, ignore_errors=True)
  runs = [evaluate(args.config, args.checkpoint, ann_file, img_dir, 'buckets', ''),
          evaluate(args.config, args.checkpoint, ann_file, img_dir, 'exact', cache),
          evaluate(args.config, args.checkpoint, ann_file, img_dir, 'exact', cache)]
  runs[1]['cache'], runs[2]['cache'] = 'cold', 'warm'
  for r in runs:
    print(json.dumps(r))


if __name__ == '__main__':
  main()
