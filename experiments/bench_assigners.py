"""Assigner speed: jitted, vmapped over a batch of 8 images of 800x1216, on the default device.

  python experiments/bench_assigners.py            # jaxdet's assigners
  python experiments/bench_assigners.py --mmdet    # also mmdetection's ATSSAssigner (torch CPU)
  python experiments/bench_assigners.py --dense    # also atss_assign_dense (slow)

Prints one line per measurement: compile time (s) and ms per image (median of --repeats
timed calls of the whole batch, divided by the batch size).  Scenes: ``--num-gt`` random
COCO-like boxes (sides log-uniform in 8..600 px, inside the image) padded to ``--pad-gt``
with garbage rows; each image has its own padded area (valid flags) as in a bucketed batch.

- ATSS: 1 anchor per location, octave base scale 8, strides 8..128 -> 20,267 anchors.
- MaxIoU: RetinaNet, 9 anchors per location -> 182,403 anchors, thresholds 0.5 / 0.4 / 0.
- FCOS: 20,267 points, mmdetection's regress ranges.
"""
import argparse
import os
import sys
import time

import jax
import numpy as np

try:
  import jaxdet  # noqa: F401
except ImportError:  # run from a checkout without installing
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STRIDES = (8, 16, 32, 64, 128)


def featmap_sizes(image_hw):
  return tuple((-(-image_hw[0] // s), -(-image_hw[1] // s)) for s in STRIDES)


def anchors_numpy(sizes, ratios, scales):
  """mmdetection's AnchorGenerator (centre offset 0) in numpy float32, if priors.py is absent."""
  f32 = np.float32
  levels = []
  for (h, w), stride in zip(sizes, STRIDES):
    h_ratios = np.sqrt(np.asarray(ratios, f32))
    w_ratios = f32(1) / h_ratios
    scales32 = np.asarray(scales, np.float64).astype(f32)
    ws = (f32(stride) * w_ratios[:, None] * scales32[None, :]).reshape(-1)
    hs = (f32(stride) * h_ratios[:, None] * scales32[None, :]).reshape(-1)
    base = np.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], axis=-1)
    ys, xs = np.meshgrid(np.arange(h, dtype=f32) * stride, np.arange(w, dtype=f32) * stride,
                         indexing='ij')
    shifts = np.stack([xs, ys, xs, ys], axis=-1).reshape(-1, 1, 4)
    levels.append((shifts + base[None]).reshape(-1, 4))
  return np.concatenate(levels).astype(f32)


def make_anchors(sizes, ratios, octave_base_scale, scales_per_octave):
  scales = [octave_base_scale * 2**(i / scales_per_octave) for i in range(scales_per_octave)]
  try:
    from jaxdet.priors import anchor_grid
  except ImportError:
    return anchors_numpy(sizes, ratios, scales)
  return np.asarray(anchor_grid(sizes, strides=STRIDES, ratios=ratios,
                                octave_base_scale=octave_base_scale,
                                scales_per_octave=scales_per_octave))


def valid_numpy(sizes, pad_hw, per_loc):
  """mmdetection's valid flags for one image's padded area (batch, 2) -> (batch, A)."""
  flags = []
  for (h, w), stride in zip(sizes, STRIDES):
    vy = np.arange(h)[None, :] * stride < pad_hw[:, :1]
    vx = np.arange(w)[None, :] * stride < pad_hw[:, 1:]
    cells = (vy[:, :, None] & vx[:, None, :]).reshape(len(pad_hw), -1)
    flags.append(np.repeat(cells, per_loc, axis=1))
  return np.concatenate(flags, axis=1)


def make_batch(rng, batch, num_gt, pad_gt, image_hw):
  """Random gts inside each image's own (smaller) area, garbage padding rows."""
  pad_hw = np.stack([rng.integers(image_hw[0] * 3 // 4, image_hw[0] + 1, batch),
                     rng.integers(image_hw[1] * 3 // 4, image_hw[1] + 1, batch)], axis=1)
  size = np.exp(rng.uniform(np.log(8), np.log(600), (batch, num_gt, 2)))
  size = np.minimum(size, pad_hw[:, None, ::-1] - 1)
  x1y1 = rng.uniform(0, 1, (batch, num_gt, 2)) * (pad_hw[:, None, ::-1] - size)
  boxes = np.concatenate([x1y1, x1y1 + size], axis=-1).astype(np.float32)
  gt = np.full((batch, pad_gt, 4), np.nan, np.float32)
  gt[:, :num_gt] = boxes
  mask = np.zeros((batch, pad_gt), bool)
  mask[:, :num_gt] = True
  labels = rng.integers(0, 80, (batch, pad_gt)).astype(np.int32)
  return gt, labels, mask, pad_hw


def timeit(name, fn, args, batch, repeats):
  """Compiles ``fn`` (jitted) on ``args`` and prints compile time and median ms per image."""
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(*args))  # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  ms = 1e3 * np.median(times) / batch
  print(f'{name}: compile {compile_s:.2f} s, {ms:.2f} ms/img (batch {batch}, median of '
        f'{repeats}, {jax.devices()[0].platform})', flush=True)
  return compiled


def bench_atss(args, gt, labels, mask, pad_hw, sizes):
  from jaxdet.assigners.atss import atss_assign, atss_assign_dense
  anchors = make_anchors(sizes, (1.,), 8, 1)
  counts = tuple(h * w for h, w in sizes)
  valid = valid_numpy(sizes, pad_hw, 1)
  for grid in (True, False) if args.dense else (True,):
    fn = jax.jit(jax.vmap(
        (lambda a, g, l, m, v: atss_assign(a, g, l, m, sizes, valid=v)) if grid else
        (lambda a, g, l, m, v: atss_assign_dense(a, g, l, m, counts, valid=v)),
        in_axes=(None, 0, 0, 0, 0)))
    timeit(f'{"atss_assign" if grid else "atss_assign_dense"} ({len(anchors)} anchors, '
           f'G={args.num_gt} padded to {args.pad_gt})', fn,
           (anchors, gt, labels, mask, valid), args.batch, args.repeats)
  return anchors, counts, valid


def bench_max_iou(args, gt, labels, mask, pad_hw, sizes):
  try:
    from jaxdet.assigners.max_iou import max_iou_assign
  except ImportError as e:
    print(f'max_iou_assign: skipped ({e})')
    return
  anchors = make_anchors(sizes, (0.5, 1., 2.), 4, 3)
  valid = valid_numpy(sizes, pad_hw, 9)
  fn = jax.jit(jax.vmap(lambda a, g, l, m, v: max_iou_assign(
      a, g, l, m, valid=v, pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.),
      in_axes=(None, 0, 0, 0, 0)))
  timeit(f'max_iou_assign (RetinaNet, {len(anchors)} anchors, G={args.num_gt} padded to '
         f'{args.pad_gt})', fn, (anchors, gt, labels, mask, valid), args.batch, args.repeats)


def bench_fcos(args, gt, labels, mask, sizes):
  try:
    from jaxdet.assigners.fcos import fcos_assign
  except ImportError as e:
    print(f'fcos_assign: skipped ({e})')
    return
  try:
    from jaxdet.priors import point_grid
    points = np.asarray(point_grid(sizes, strides=STRIDES))
  except ImportError:  # mmdetection's MlvlPointGenerator, offset 0.5: rows, then columns
    points = np.concatenate([
        np.stack(np.meshgrid((np.arange(w) + 0.5) * s, (np.arange(h) + 0.5) * s), axis=-1)
        .reshape(-1, 2) for (h, w), s in zip(sizes, STRIDES)]).astype(np.float32)
  counts = tuple(h * w for h, w in sizes)
  fn = jax.jit(jax.vmap(lambda p, g, l, m: fcos_assign(
      p, g, l, m, num_level_points=counts, strides=STRIDES), in_axes=(None, 0, 0, 0)))
  timeit(f'fcos_assign ({len(points)} points, G={args.num_gt} padded to {args.pad_gt})', fn,
         (points, gt, labels, mask), args.batch, args.repeats)


def bench_mmdet(args, gt, labels, mask, anchors, counts, valid):
  """mmdetection 3.3's ATSSAssigner per image, as ATSSHead calls it (invalid anchors removed)."""
  try:
    import mmcv.utils.ext_loader as ext_loader
    ext_loader.load_ext = lambda name, funcs: None  # mmcv-lite has no compiled ops
    import torch
    from mmdet.models.task_modules.assigners import ATSSAssigner
    from mmengine.structures import InstanceData
  except ImportError as e:
    print(f'mmdet ATSSAssigner: skipped ({e})')
    return
  assigner = ATSSAssigner(topk=9)
  level_of = np.repeat(np.arange(len(counts)), counts)
  times = []
  for _ in range(max(1, args.repeats // 4)):
    for i in range(args.batch):
      keep = valid[i]
      priors = InstanceData(priors=torch.from_numpy(anchors[keep]))
      real = mask[i]
      gts = InstanceData(bboxes=torch.from_numpy(gt[i][real]),
                         labels=torch.from_numpy(labels[i][real]).long())
      level_counts = np.bincount(level_of[keep], minlength=len(counts)).tolist()
      start = time.perf_counter()
      assigner.assign(priors, level_counts, gts)
      times.append(time.perf_counter() - start)
  print(f'mmdet ATSSAssigner (torch {torch.__version__} CPU, {torch.get_num_threads()} threads, '
        f'{len(anchors)} anchors, G={args.num_gt}): {1e3 * np.median(times):.2f} ms/img '
        f'(median of {len(times)})', flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--num-gt', type=int, default=100)
  parser.add_argument('--pad-gt', type=int, default=128)
  parser.add_argument('--repeats', type=int, default=20)
  parser.add_argument('--height', type=int, default=800)
  parser.add_argument('--width', type=int, default=1216)
  parser.add_argument('--dense', action='store_true', help='also time the dense ATSS path')
  parser.add_argument('--mmdet', action='store_true', help="also time mmdetection's assigner")
  parser.add_argument('--only', choices=('atss', 'max_iou', 'fcos'), default=None)
  args = parser.parse_args()

  sizes = featmap_sizes((args.height, args.width))
  rng = np.random.default_rng(0)
  gt, labels, mask, pad_hw = make_batch(rng, args.batch, args.num_gt, args.pad_gt,
                                        (args.height, args.width))
  print(f'jax {jax.__version__} on {jax.devices()[0].device_kind}; featmaps {sizes}', flush=True)
  if args.only in (None, 'atss'):
    anchors, counts, valid = bench_atss(args, gt, labels, mask, pad_hw, sizes)
    if args.mmdet:
      bench_mmdet(args, gt, labels, mask, anchors, counts, valid)
  if args.only in (None, 'max_iou'):
    bench_max_iou(args, gt, labels, mask, pad_hw, sizes)
  if args.only in (None, 'fcos'):
    bench_fcos(args, gt, labels, mask, sizes)


if __name__ == '__main__':
  main()
