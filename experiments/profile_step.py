"""Where a training step's CPU time goes: per-op totals from a ``jax.profiler`` trace.

  python experiments/profile_step.py --config configs/atss.py:smoke --size 160 160 --batch 16
  python experiments/profile_step.py --config configs/retinanet.py --size 512 512 --batch 2

Compiles the training step exactly as ``experiments/bench_train.py`` does (random init, random
images, 10 boxes), runs ``--steps`` steps under ``jax.profiler.trace``, reads the trace back with
``jax.profiler.ProfileData`` and prints the XLA:CPU thunks (one per fused kernel, convolution,
dot, custom call) grouped by kind: total ms per step, share of the step, count per step; then the
``--top`` single ops; then the same time by module path (the HLO ``op_name`` of each thunk: e.g.
``fwd backbone/layer1_0``, ``bwd head/...``, DCN calls as ``DCN neck``). Wall ms per step is
printed too (the thunks of both cores overlap, so their sum may exceed it; the trace itself
slows the step).
"""
import argparse
import collections
import functools
import os
import re
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'experiments'))

import jax  # noqa: E402

from bench_train import random_batch  # noqa: E402
from jaxdet.engine import config_cli, steps, train_state  # noqa: E402
from jaxdet.engine.xla_cpu_flags import set_xla_cpu_flags  # noqa: E402
from jaxdet.models.detectors import build_detector, compute_dtype  # noqa: E402


def module_of(op_name, depth=2):
  """'jit(_fun)/transpose(jvp(SingleStageDetector))/head/cls_convs_1/conv' -> 'bwd head/cls_convs_1';
  'jit(_fun)/jvp(hungarian_match)/while/body/eq' -> 'fwd hungarian_match/while' (a named scope
  under a transformation keeps its name; the detector's root module, capitalised, is dropped)."""
  direction = 'bwd' if 'transpose(' in op_name else 'fwd'
  parts = []
  for part in op_name.split('/'):
    if part.startswith('jit(_fun'):
      continue
    inner = part
    while (m := re.fullmatch(r'(?:jvp|transpose|jit|vmap|remat)\((.*)\)', inner)):
      inner = m.group(1)
    if inner != part and inner[:1].isupper():
      continue
    parts.append(inner)
  if 'deform_conv' in op_name:
    return f'{direction} DCN {parts[0] if parts else ""}'
  return f'{direction} ' + '/'.join(parts[:depth])


def compile_step(spec, size, batch):
  config = config_cli.load_config(spec)
  config.model.backbone.pretrained = ''
  det = build_detector(config.model, 'float32')
  state, tx = train_state.create_train_state(det, config, (1, *size, 3), lambda s: 0.01)
  state = train_state.replicate(state)
  step = jax.pmap(functools.partial(steps.train_step, detector=det, tx=tx,
                                    pipeline=config.data.pipeline,
                                    dtype=compute_dtype('float32')),
                  axis_name=steps.AXIS, devices=jax.local_devices()[:1], donate_argnums=(0,))
  return step, state, random_batch(batch, *size)


def kind_of(name):
  """A coarse kind from a thunk's name (XLA names: convolution.12, loop_add_fusion.3, ...)."""
  base = re.sub(r'[._]\d+$', '', name)
  for kind in ('convolution', 'custom-call', 'dot', 'sort', 'scatter', 'gather',
               'reduce-window', 'select-and-scatter', 'while', 'copy', 'transpose',
               'reduce', 'fusion'):
    if kind in base:
      return kind
  return base


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--config', default='configs/atss.py:smoke')
  p.add_argument('--size', type=int, nargs=2, default=(160, 160))
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--steps', type=int, default=3)
  p.add_argument('--top', type=int, default=25)
  p.add_argument('--xla-defaults', action='store_true',
                 help="XLA:CPU's own defaults instead of jaxdet's flags (jaxdet/engine/xla_cpu_flags.py)")
  args = p.parse_args()
  if not args.xla_defaults:
    set_xla_cpu_flags(config_cli.load_config(args.config))  # the config's xla_cpu_flags
  step, state, batch = compile_step(args.config, args.size, args.batch)
  hlo = step.lower(state, batch).compile().as_text()
  op_names = dict(re.findall(r'%(\S+) = [^\n]*?op_name="([^"]*)"', hlo))
  for _ in range(2):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  logdir = tempfile.mkdtemp()
  t = time.time()
  with jax.profiler.trace(logdir):
    for _ in range(args.steps):
      state, m = step(state, batch)
    jax.block_until_ready(m)
  wall = (time.time() - t) / args.steps * 1e3
  path = next(os.path.join(d, f) for d, _, fs in os.walk(logdir) for f in fs
              if f.endswith('.xplane.pb'))
  data = jax.profiler.ProfileData.from_file(path)
  per_op = collections.Counter()
  count = collections.Counter()
  per_module = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for ev in line.events:
        if ev.name.startswith(('Thunk', '$', 'PjRt', 'Execute')) or ' ' in ev.name:
          continue
        per_op[ev.name] += ev.duration_ns / 1e6 / args.steps
        count[ev.name] += 1
        module = module_of(op_names[ev.name]) if ev.name in op_names else '(no op_name)'
        per_module[module] += ev.duration_ns / 1e6 / args.steps
  by_kind = collections.Counter()
  kind_count = collections.Counter()
  for name, ms in per_op.items():
    by_kind[kind_of(name)] += ms
    kind_count[kind_of(name)] += count[name] / args.steps
  total = sum(by_kind.values())
  print(f'{args.config} {args.size[0]}x{args.size[1]} b{args.batch}: wall {wall:.1f} ms/step, '
        f'sum of ops {total:.1f} ms/step')
  for kind, ms in by_kind.most_common():
    print(f'  {kind:22s} {ms:8.1f} ms {100 * ms / total:5.1f}%  x{kind_count[kind]:.0f}')
  print('top ops:')
  for name, ms in per_op.most_common(args.top):
    print(f'  {name:40s} {ms:8.2f} ms  {op_names.get(name, "")[-90:]}')
  print('by module:')
  for name, ms in per_module.most_common(args.top):
    print(f'  {name:50s} {ms:8.1f} ms {100 * ms / total:5.1f}%')


if __name__ == '__main__':
  main()
