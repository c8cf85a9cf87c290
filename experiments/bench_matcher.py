"""Hungarian matcher speed on DETR's workload: ``hungarian_match`` methods vs optax vs scipy.

  nice -n 5 python experiments/bench_matcher.py               # both workloads, all solvers
  nice -n 5 python experiments/bench_matcher.py --repeats 50 --only device host

Workloads (DETR matches every decoder layer's output, every image, every step):
- ``6x16``: 6 decoder layers x 16 images, 100 queries x 100 padded gt columns, 1-50 real gts per
  image (uniform), the same gts for every layer;
- ``2x2``: 2 layers x 2 images, same sizes.
Costs are built as DETR builds them, by ``detr_match_cost`` (class 1 + L1 5 + GIoU 2) on random
predicted boxes and logits (91 classes + no-object) and random gt boxes; padded gt columns hold
garbage (their boxes are NaN).

Solvers, one line each: compile time (s) and ms per call for the whole workload (median and min
of ``--repeats`` rounds after a warm-up; each round calls every solver once, so load swings on a
shared machine hit all alike), and the median's ratio to the scipy loop's:
- ``device`` / ``host`` / ``auto`` (= device): ``hungarian_match(cost, col_mask, method=...)`` jitted,
  one call;
- ``optax``: ``optax.assignment.hungarian_algorithm`` vmapped over the flattened batch, on the
  (M, N + M) padded problem the previous ``hungarian_match`` built (gts as rows, one dummy each);
- ``scipy loop``: ``linear_sum_assignment`` on ``cost[:, valid]`` in a Python loop over the numpy
  costs (no device transfer: the costs are already on the host).
"""
import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

try:
  import jaxdet  # noqa: F401
except ImportError:  # run from a checkout without installing
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxdet.assigners.hungarian import detr_match_cost, hungarian_match  # noqa: E402

NUM_CLASSES = 91


def random_cxcywh(rng, shape):
  wh = rng.uniform(0.02, 0.6, shape + (2,))
  cxcy = rng.uniform(wh / 2, 1 - wh / 2)
  return np.concatenate([cxcy, wh], -1).astype(np.float32)


def detr_workload(rng, layers, images, queries=100, pad_gt=100, max_gt=50):
  """(layers, images, queries, pad_gt) float32 DETR costs and the (images, pad_gt) gt mask."""
  num_gt = rng.integers(1, max_gt + 1, images)
  mask = np.arange(pad_gt)[None, :] < num_gt[:, None]
  gt_boxes = np.where(mask[..., None], random_cxcywh(rng, (images, pad_gt)), np.nan)
  gt_labels = rng.integers(0, NUM_CLASSES, (images, pad_gt)).astype(np.int32)
  logits = rng.normal(0, 2, (layers, images, queries, NUM_CLASSES + 1)).astype(np.float32)
  pred_boxes = random_cxcywh(rng, (layers, images, queries))
  per_image = jax.vmap(detr_match_cost)  # over images
  cost = jax.jit(jax.vmap(per_image, in_axes=(0, 0, None, None)))(
      logits, pred_boxes, gt_labels, gt_boxes.astype(np.float32))
  return np.asarray(cost), mask


def optax_match(cost, col_mask):
  """The previous ``hungarian_match``: optax's solver on the (M, N + M) dummy problem, vmapped."""
  from optax.assignment import hungarian_algorithm

  def one(cost, col_mask):
    num_rows, num_cols = cost.shape
    valid_max = jnp.max(jnp.where(col_mask[None, :], cost, -jnp.inf))
    big = jnp.maximum(2 * valid_max, 0.) + 1.
    to_queries = jnp.where(col_mask[:, None], cost.T, 2 * big)
    own_dummy = jnp.where(col_mask, big, 0.)
    to_dummies = jnp.where(jnp.eye(num_cols, dtype=bool), own_dummy[:, None], 2 * big)
    gts, partners = hungarian_algorithm(jnp.concatenate([to_queries, to_dummies], axis=1))
    col_to_row = jnp.full((num_cols,), -1, jnp.int32).at[gts].set(partners.astype(jnp.int32))
    return jnp.where(col_mask & (col_to_row < num_rows), col_to_row, -1)

  num_rows, num_cols = cost.shape[-2:]
  flat = jax.vmap(one)(cost.reshape(-1, num_rows, num_cols),
                       jnp.broadcast_to(col_mask, cost.shape[:-2] + (num_cols,)).reshape(
                           -1, num_cols))
  return flat.reshape(cost.shape[:-2] + (num_cols,))


def scipy_loop(cost, col_mask):
  col_mask = np.broadcast_to(col_mask, cost.shape[:-2] + cost.shape[-1:])
  out = np.full(col_mask.shape, -1, np.int32)
  for idx in np.ndindex(cost.shape[:-2]):
    valid = np.flatnonzero(col_mask[idx])
    rows, cols = linear_sum_assignment(cost[idx][:, valid])
    out[idx + (valid[cols],)] = rows
  return out


def total_cost(cost, col_to_row):
  picked = np.take_along_axis(cost, np.maximum(col_to_row, 0)[..., None, :], -2)[..., 0, :]
  return np.where(col_to_row >= 0, picked, 0.).astype(np.float64).sum()


def bench(name, cost, mask, solvers, repeats):
  """Compiles every solver, then times them round-robin (one call each per round) so that the
  shared machine's load swings hit all of them alike; prints median and min ms per call."""
  want = total_cost(cost, scipy_loop(cost, mask))
  fns, compile_s = {}, {}
  for solver in solvers:
    if solver == 'scipy':
      fns[solver], compile_s[solver] = (lambda: scipy_loop(cost, mask)), 0.
      continue
    f = optax_match if solver == 'optax' else (
        lambda c, m, solver=solver: hungarian_match(c, m, method=solver)[1])
    args = (jnp.asarray(cost), jnp.asarray(mask))
    start = time.perf_counter()
    compiled = jax.jit(f).lower(*args).compile()
    compile_s[solver] = time.perf_counter() - start
    fns[solver] = lambda compiled=compiled, args=args: compiled(*args)
  ok = {}
  for solver, fn in fns.items():
    got = total_cost(cost, np.asarray(fn()))
    ok[solver] = 'ok' if np.isclose(got, want, rtol=1e-5, atol=1e-3) else f'WRONG {got} vs {want}'
  times = {solver: [] for solver in fns}
  for _ in range(repeats):
    for solver, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[solver].append(1e3 * (time.perf_counter() - start))
  base = np.median(times['scipy']) if 'scipy' in times else np.nan
  for solver in fns:
    med = np.median(times[solver])
    print(f'{name} {solver}: compile {compile_s[solver]:.2f} s, median {med:.2f} ms/call '
          f'(min {np.min(times[solver]):.2f}), {med / base:.2f}x scipy loop ({ok[solver]}, '
          f'{repeats} rounds, {jax.devices()[0].platform}, load {os.getloadavg()[0]:.1f})',
          flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--repeats', type=int, default=20)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--only', nargs='+', default=('device', 'host', 'auto', 'optax', 'scipy'),
                      choices=('device', 'host', 'auto', 'optax', 'scipy'))
  parser.add_argument('--workloads', nargs='+', default=('6x16', '2x2'))
  args = parser.parse_args()
  print(f'jax {jax.__version__} on {jax.devices()[0].device_kind}, load '
        f'{os.getloadavg()[0]:.1f}', flush=True)
  rng = np.random.default_rng(args.seed)
  for workload in args.workloads:
    layers, images = (int(x) for x in workload.split('x'))
    cost, mask = detr_workload(rng, layers, images)
    mask = np.broadcast_to(mask, (layers,) + mask.shape)
    print(f'{workload}: {layers} layers x {images} images, 100 x 100 costs, real gts per image '
          f'{mask[0].sum(1).tolist()}', flush=True)
    bench(workload, cost, mask, args.only, args.repeats)


if __name__ == '__main__':
  main()
