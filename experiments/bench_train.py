"""Training-step throughput of a jaxdet detector (the whole step: normalisation, network,
assigner, losses, gradients, SGD update with the config's paramwise rules), next to
torchvision's RetinaNet / FCOS R50-FPN in the same process.

  python experiments/bench_train.py --size 512 512 --batch 2                 # CPU, ATSS (issue 5)
  python experiments/bench_train.py --config configs/retinanet.py configs/fcos.py \
      --size 512 512 --batch 2 --torchvision RetinaNet FCOS                 # CPU (issue 6)
  python experiments/bench_train.py --config configs/retinanet.py configs/fcos.py \
      --size 512 512 --batch 2 --cpu-devices 2 --torchvision RetinaNet FCOS # CPU split (issue 20)
  python experiments/bench_train.py --config configs/ssd300.py --size 300 300 --batch 2 \
      --steps 2 --lr 1e-5 --torchvision SSD300                              # CPU (issue 17)
  python experiments/bench_train.py --config configs/ssd512.py --size 512 512 --batch 2 \
      --steps 2 --lr 1e-5                                                   # CPU (issue 17)
  python experiments/bench_train.py --config configs/atss.py configs/retinanet.py configs/fcos.py \
      --size 800 1216 --batch 8 --dtype bfloat16 --torchvision RetinaNet FCOS   # GPU

Prints one line per measurement: img/s, ms/step, compile s, peak memory. Random init, random
uint8 images, 10 random boxes per image (padded to 16). Needs only jax, flax, optax, numpy,
ml_collections (and torch + torchvision for --torchvision): no data pipeline.
"""
import argparse
import functools
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxdet.engine import config_cli, steps, train_state  # noqa: E402
from jaxdet.engine.xla_cpu_flags import set_xla_cpu_flags  # noqa: E402
from jaxdet.models.detectors import build_detector, compute_dtype  # noqa: E402


def peak_memory_gb():
  dev = jax.local_devices()[0]
  stats = dev.memory_stats() if hasattr(dev, 'memory_stats') else None
  if stats and 'peak_bytes_in_use' in stats:
    return stats['peak_bytes_in_use'] / 2**30
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def random_batch(batch, height, width, num_boxes=10, max_gt=16, seed=0):
  rng = np.random.default_rng(seed)
  xy = rng.uniform(0, [width * 0.8, height * 0.8], (batch, max_gt, 2))
  wh = rng.uniform(16, [width * 0.4, height * 0.4], (batch, max_gt, 2))
  boxes = np.concatenate([xy, np.minimum(xy + wh, [width, height])], -1).astype(np.float32)
  b = dict(image=rng.integers(0, 256, (batch, height, width, 3), dtype=np.uint8),
           gt_boxes=boxes, gt_labels=rng.integers(0, 80, (batch, max_gt)).astype(np.int32),
           gt_mask=np.arange(max_gt)[None].repeat(batch, 0) < num_boxes,
           img_shape=np.tile([height, width], (batch, 1)).astype(np.int32),
           pad_shape=np.tile([height, width], (batch, 1)).astype(np.int32))
  return {k: v[None] for k, v in b.items()}  # leading device axis of 1


def make_jaxdet(args, spec):
  """Compile a jaxdet training step; returns (label, one_step: () -> None, blocking)."""
  config = config_cli.load_config(spec)
  config.model.backbone.pretrained = ''   # random init
  pipeline = config.data.pipeline
  det = build_detector(config.model, args.dtype)
  sched = lambda step: args.lr
  h, w = args.size
  t = time.time()
  state, tx = train_state.create_train_state(det, config, (1, h, w, 3), sched)
  init_s = time.time() - t
  state = train_state.replicate(state)
  n = jax.local_device_count()   # 1, or --cpu-devices
  step = jax.pmap(functools.partial(steps.train_step, detector=det, tx=tx, pipeline=pipeline,
                                    dtype=compute_dtype(args.dtype)),
                  axis_name=steps.AXIS, devices=jax.local_devices()[:n], donate_argnums=(0,))
  batch = {k: v.reshape((n, -1) + v.shape[2:]) for k, v in random_batch(args.batch, h, w).items()}
  box = {}

  def one():
    box['state'], box['metrics'] = step(box.get('state', state), batch)
    jax.block_until_ready(box['metrics'])

  t = time.time()
  one()
  compile_s = time.time() - t
  name = os.path.splitext(os.path.basename(spec))[0]
  where = jax.devices()[0].platform + (f' ({n} devices)' if n > 1 else '')
  label = f'jaxdet {name} train {h}x{w} b{args.batch} {args.dtype} on {where}'
  extra = lambda: (f'compile {compile_s:.1f} s (init {init_s:.1f} s), peak mem '
                   f'{peak_memory_gb():.2f} GB, loss {float(box["metrics"]["loss"][0]):.3f}')
  return label, one, extra


def bench(args, side):
  """Warm up, time --steps steps of one side (label, one_step, extra) and print its line."""
  label, one, extra = side
  for _ in range(args.warmup):
    one()
  sec = timed(one, args.steps)
  print(f'{label}: {args.batch / sec:.2f} img/s, {sec * 1e3:.1f} ms/step, {extra()}', flush=True)


def timed(one, n):
  """Mean seconds of n calls of one()."""
  t = time.time()
  for _ in range(n):
    one()
  return (time.time() - t) / n


def make_torchvision(args, name):
  """Build a torchvision detector and its SGD step; returns (label, one_step, extra)."""
  import torch
  import torchvision
  from torchvision.models.detection import fcos_resnet50_fpn, retinanet_resnet50_fpn
  from torchvision.ops import misc
  dev = torch.device(args.device)
  torch.backends.cudnn.benchmark = True
  torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
  h, w = args.size
  if name == 'SSD300':   # VGG16 SSD, 81 classes with background, as mmdetection's SSD300
    from torchvision.models.detection import ssd300_vgg16
    model = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=81,
                         trainable_backbone_layers=5)   # resizes every image to 300 x 300
    arch = 'VGG16'
  else:
    make = retinanet_resnet50_fpn if name == 'RetinaNet' else fcos_resnet50_fpn
    backbone = torchvision.models.resnet50(norm_layer=misc.FrozenBatchNorm2d)
    model = make(weights=None, weights_backbone=None, num_classes=80, min_size=min(h, w),
                 max_size=max(h, w), trainable_backbone_layers=3)
    model.backbone.body.load_state_dict(
        {k: v for k, v in backbone.state_dict().items() if not k.startswith('fc.')},
        strict=False)
    arch = 'R50-FPN'
  model.to(dev).train()
  opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
  b = random_batch(args.batch, h, w)
  images = [torch.rand(3, h, w, device=dev) for _ in range(args.batch)]
  targets = [dict(boxes=torch.tensor(b['gt_boxes'][0, i, :10], device=dev),
                  labels=torch.tensor(b['gt_labels'][0, i, :10], device=dev).long()
                  + (name == 'SSD300'))   # torchvision's SSD: label 0 is the background
             for i in range(args.batch)]
  amp = args.dtype == 'bfloat16'

  def one():
    with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
      loss = sum(model(images, targets).values())
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss

  sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)

  def one_synced():
    one()
    sync()

  one_synced()
  if dev.type == 'cuda':
    torch.cuda.reset_peak_memory_stats()
  label = f'torchvision {name} {arch} train {h}x{w} b{args.batch} {args.dtype} on {dev.type}'
  extra = lambda: 'peak mem %.2f GB' % (
      torch.cuda.max_memory_allocated() / 2**30 if dev.type == 'cuda'
      else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
  return label, one_synced, extra


def bench_interleaved(args, spec, name):
  """jaxdet's and torchvision's steps alternately, one of each per round, so that the machine's
  drifting speed (~10% within minutes on a shared 2-core host) hits both alike; prints the
  median ms of each and the median of the per-round ratios torchvision / jaxdet."""
  sides = [make_jaxdet(args, spec), make_torchvision(args, name)]
  for _, one, _ in sides:
    for _ in range(args.warmup):
      one()
  ms = [[], []]
  for _ in range(args.steps):
    for i, (_, one, _) in enumerate(sides):
      ms[i].append(1e3 * timed(one, 1))
  ratios = np.array(ms[1]) / np.array(ms[0])
  for (label, _, extra), m in zip(sides, ms):
    print(f'{label}: median {np.median(m):.1f} ms/step over {args.steps} rounds '
          f'(min {min(m):.1f}, max {max(m):.1f}), {extra()}', flush=True)
  print(f'interleaved {os.path.basename(spec)} vs torchvision {name}: torchvision / jaxdet = '
        f'{np.median(ratios):.3f}x median of {args.steps} rounds (min {ratios.min():.3f}, '
        f'max {ratios.max():.3f})', flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--config', nargs='+', default=['configs/atss.py'],
                 help='jaxdet configs to time (their model, optimizer and pipeline)')
  p.add_argument('--size', type=int, nargs=2, default=(512, 512), metavar=('H', 'W'))
  p.add_argument('--batch', type=int, default=2)
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  p.add_argument('--steps', type=int, default=5)
  p.add_argument('--warmup', type=int, default=1)
  p.add_argument('--lr', type=float, default=0.01,
                 help='fixed SGD lr of both sides (SSD from random init, plain VGG16 without warmup, diverges at 1e-3)')
  p.add_argument('--torchvision', nargs='*', default=None,
                 help='also time torchvision models (RetinaNet, FCOS, SSD300; default: RetinaNet)')
  p.add_argument('--device', default=None, help="torch's device (default: cuda on a GPU host)")
  p.add_argument('--cpu-devices', type=int, default=1,
                 help="jaxdet on the CPU split into N XLA devices, batch / N images each "
                      "(jaxdet's config.cpu_devices)")
  p.add_argument('--skip-jaxdet', action='store_true')
  p.add_argument('--interleave', action='store_true',
                 help='alternate each config with the torchvision model of the same position, '
                      'one step each per round (--steps rounds), and report the median ratio')
  p.add_argument('--xla-defaults', action='store_true',
                 help="XLA:CPU's own defaults instead of jaxdet's flags (jaxdet/engine/xla_cpu_flags.py)")
  args = p.parse_args()
  args.config = [os.path.join(ROOT, spec) for spec in args.config]   # kept if absolute
  if not args.xla_defaults:  # before JAX starts its backends, as python -m jaxdet.train
    configs = [config_cli.load_config(spec) for spec in args.config]
    flags = {c.get('xla_cpu_flags') for c in configs}
    if len(flags) > 1:
      p.error(f'the configs set different xla_cpu_flags {flags} (process-wide): bench them in '
              'separate runs')
    set_xla_cpu_flags(configs[0])
  if args.cpu_devices > 1:   # before JAX starts its backends
    jax.config.update('jax_num_cpu_devices', args.cpu_devices)
  args.device = args.device or ('cuda' if jax.devices()[0].platform == 'gpu' else 'cpu')
  if args.interleave:
    if len(args.config) != len(args.torchvision or []):
      p.error('--interleave pairs each --config with one --torchvision model: give as many of each')
    for spec, name in zip(args.config, args.torchvision):
      bench_interleaved(args, spec, name)
    return
  if not args.skip_jaxdet:
    for spec in args.config:
      bench(args, make_jaxdet(args, spec))
  if args.torchvision is not None:
    for name in args.torchvision or ['RetinaNet']:
      bench(args, make_torchvision(args, name))


if __name__ == '__main__':
  main()
