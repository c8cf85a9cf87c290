"""Images/s of the training input pipeline at (1333, 800), with 0, 1 and 2 worker processes.

Writes a COCO folder of 640 x 480 JPEGs of natural-looking noise (smooth colour fields plus
grain, quality 90: ~120 KB like COCO's) with 7 boxes each, reads it through
``jaxdet.data.sources.CocoSource`` and times the real training loader (decode, resize to
1067 x 800, flip, pad into the 800 x 1344 bucket, gt padding) at batch 2 on one device. The
first batches (worker start-up) are not timed. One line per measurement.

  python experiments/bench_data.py [--images 96] [--batches 40] [--workers 0 1 2]
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from configs._base_ import data as data_config  # noqa: E402
from jaxdet.data import loader as L  # noqa: E402
from jaxdet.data import sources  # noqa: E402


def natural_noise(rng, h=480, w=640):
  """Smooth random colour fields plus fine grain: JPEG-compresses like a photo."""
  low = rng.uniform(0, 255, (12, 16, 3)).astype(np.uint8)
  img = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), np.float32)
  img += rng.normal(0, 12, img.shape)
  return np.clip(img, 0, 255).astype(np.uint8)


def make_coco(root, n, seed=0):
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  images, anns = [], []
  for i in range(n):
    name = f"{i:06d}.jpg"
    Image.fromarray(natural_noise(rng)).save(os.path.join(root, "images", name), quality=90)
    images.append(dict(id=i + 1, file_name=name, height=480, width=640))
    for _ in range(7):
      x, y = rng.uniform(0, 500), rng.uniform(0, 360)
      bw, bh = rng.uniform(8, 140), rng.uniform(8, 120)
      anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=int(rng.integers(1, 4)),
                       bbox=[x, y, bw, bh], area=bw * bh, iscrowd=0))
  cats = [dict(id=k, name=f"c{k}") for k in (1, 2, 3)]
  ann_file = os.path.join(root, "instances.json")
  with open(ann_file, "w") as f:
    json.dump(dict(images=images, annotations=anns, categories=cats), f)
  return ann_file, os.path.join(root, "images")


def measure(source, workers, batches, warmup=3):
  c = data_config.get_config()
  c.workers_per_gpu = workers
  c.samples_per_gpu = 2
  ld = L.build_train_loader(c, source, seed=0, num_devices=1, process_index=0, process_count=1)
  t0 = time.perf_counter()
  it = iter(ld)
  for _ in range(warmup):
    next(it)
  t1 = time.perf_counter()
  for _ in range(batches):
    b = next(it)
  t2 = time.perf_counter()
  it.close()
  n = batches * b["image"].shape[0] * b["image"].shape[1]
  return n / (t2 - t1), t1 - t0, b["image"].shape


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--images", type=int, default=96)
  p.add_argument("--batches", type=int, default=40)
  p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
  args = p.parse_args()
  with tempfile.TemporaryDirectory() as root:
    source = sources.CocoSource(*make_coco(root, args.images))
    for w in args.workers:
      rate, startup, shape = measure(source, w, args.batches)
      print(f"bench_data workers={w} img/s={rate:.1f} batch_shape={shape} "
            f"timed_images={args.batches * shape[0] * shape[1]} startup_s={startup:.1f} "
            f"cpus={os.cpu_count()}", flush=True)


if __name__ == "__main__":
  main()
