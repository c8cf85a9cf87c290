"""Inference throughput of a jaxdet detector: the jitted (pmapped) `predict_step` that
evaluation and `jaxdet.Detector` run -- uint8 -> normalise, network, post-processing (score
filter, top-k, decode, class-aware NMS) -- on random 800x1333 images, random init.

  python experiments/bench_infer.py                                   # CPU: ATSS R50, b1 + b8, fp32
  python experiments/bench_infer.py --batch 1 8 --iters 2 --dtype float32 bfloat16
  python experiments/bench_infer.py --platform gpu --iters 20 --dtype float32 bfloat16   # GPU

Prints one line per (dtype, batch): img/s and ms/batch over `--iters` timed calls after one
untimed call (compilation + first run, reported as 'first call'), and the same through
`Detector.__call__` (host test transform, bucketing, batching and the copy back included) with
`--e2e`. Images are 800 x 1333 (the test transform keeps them, scale factor 1) padded into the
800 x 1344 bucket. Random init: post-processing still sorts / NMSes the full fixed-size
candidate sets, so the timing does not depend on the weights.
"""
import argparse
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default=os.path.join(ROOT, 'configs', 'atss.py'))
  parser.add_argument('--batch', type=int, nargs='+', default=[1, 8])
  parser.add_argument('--dtype', nargs='+', default=['float32'])
  parser.add_argument('--iters', type=int, default=2, help='timed calls per measurement')
  parser.add_argument('--size', type=int, nargs=2, default=[800, 1333], metavar=('H', 'W'))
  parser.add_argument('--platform', choices=('default', 'cpu', 'gpu'), default='default',
                      help="JAX platform ('default': JAX's choice: the GPU when there is one)")
  parser.add_argument('--e2e', action='store_true',
                      help='also time Detector.__call__ on numpy images (host work included)')
  args = parser.parse_args()
  if args.platform != 'default':
    os.environ['JAX_PLATFORMS'] = {'cpu': 'cpu', 'gpu': 'cuda'}[args.platform]

  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jaxdet.engine import config_cli  # pylint: disable=import-outside-toplevel
  from jaxdet.engine.train_state import init_variables  # pylint: disable=import-outside-toplevel
  from jaxdet.inference import Detector  # pylint: disable=import-outside-toplevel
  from jaxdet.models.detectors import build_detector  # pylint: disable=import-outside-toplevel

  dev = jax.local_devices()[0]
  print(f'# jax {jax.__version__} on {dev.platform}: {dev.device_kind} x '
        f'{jax.local_device_count()}; {os.cpu_count()} CPUs; load average '
        f'{os.getloadavg()[0]:.1f}', flush=True)
  config = config_cli.load_config(args.config)
  config.model.backbone.pretrained = ''
  h, w = args.size
  t = time.time()
  variables = init_variables(build_detector(config.model), (1, 64, 64, 3), 0)
  print(f'# {args.config}: random init {time.time() - t:.1f} s', flush=True)
  rng = np.random.default_rng(0)
  for dtype in args.dtype:
    for batch in args.batch:
      det = Detector(config, variables, dtype=dtype, batch_size=batch)
      images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(batch)]
      (device_batch,) = list(det.batches(images))
      def run(det=det, device_batch=device_batch):
        return jax.block_until_ready(det.predict_batch(device_batch))
      t = time.time()
      run()
      first = time.time() - t
      t = time.time()
      for _ in range(args.iters):
        run()
      sec = (time.time() - t) / args.iters
      shape = device_batch['image'].shape
      print(f'predict_step {dtype} batch {batch} {shape[2]}x{shape[3]}: '
            f'{batch * det.num_devices / sec:.2f} img/s ({1000 * sec:.0f} ms/batch, '
            f'{args.iters} iters; first call {first:.1f} s; peak RSS '
            f'{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GB)', flush=True)
      if args.e2e:
        t = time.time()
        for _ in range(args.iters):
          det(images)
        sec = (time.time() - t) / args.iters
        print(f'Detector.__call__ {dtype} batch {batch}: {batch / sec:.2f} img/s '
              f'({1000 * sec:.0f} ms per call of {batch} images)', flush=True)


if __name__ == '__main__':
  main()
