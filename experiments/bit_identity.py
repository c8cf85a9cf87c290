"""Is a refactor bit-identical? The first training losses and the parameters after them.

For each config, trains `--steps` steps of the `:smoke` variant through the public command
(`python -m jaxdet.train`, one CPU device, log every step), then records every per-step
metric of `metrics.jsonl` (float32 values printed exactly) and a SHA-256 of every parameter,
batch statistic and optimizer-state array of the final checkpoint (read with orbax directly, so
the record does not depend on jaxdet's own API). `--compare` checks two records equal.

  # before the change (e.g. in a worktree of the old commit), then after it:
  python experiments/bit_identity.py --out /tmp/before.json
  python experiments/bit_identity.py --out /tmp/after.json --compare /tmp/before.json

Configs default to every shipped smoke config (atss, retinanet, fcos, fcos_mstrain). ~1-2 min
each on a 2-core CPU (compile + 20 steps + one evaluation at the end).
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

CONFIGS = ('atss', 'retinanet', 'fcos', 'fcos_mstrain')


def _hash_tree(tree, prefix=''):
  out = {}
  if isinstance(tree, dict):
    for k in sorted(tree):
      out.update(_hash_tree(tree[k], f'{prefix}/{k}' if prefix else str(k)))
  elif isinstance(tree, (list, tuple)):
    for i, v in enumerate(tree):
      out.update(_hash_tree(v, f'{prefix}/{i}'))
  elif tree is None:
    pass
  else:
    a = np.ascontiguousarray(np.asarray(tree))
    out[prefix] = f'{a.dtype}{list(a.shape)}:' + hashlib.sha256(a.tobytes()).hexdigest()[:24]
  return out


def _read_state(ckpt_dir):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  steps = sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit())
  path = os.path.join(ckpt_dir, str(steps[-1]), 'state')
  with ocp.StandardCheckpointer() as ckptr:
    return steps[-1], ckptr.restore(path)


def record(name, steps, repo, keep=None):
  work = keep or tempfile.mkdtemp(prefix=f'bitid_{name}_')
  cmd = [sys.executable, '-m', 'jaxdet.train', '--config', f'configs/{name}.py:smoke',
         '--workdir', work, f'--config.max_steps={steps}', '--config.log_interval=1']
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
  if proc.returncode:
    raise SystemExit(f'{name}: training failed:\n{proc.stderr[-3000:]}')
  metrics = []
  with open(os.path.join(work, 'metrics.jsonl')) as f:
    for line in f:
      row = json.loads(line)
      if row.get('kind') == 'train':
        metrics.append({k: v for k, v in row.items()
                        if k not in ('img_per_s', 'time', 'wall_time', 'kind')})
  step, state = _read_state(os.path.join(work, 'checkpoints'))
  return dict(metrics=metrics, step=step, state=_hash_tree(state))


def compare(a, b):
  problems = []
  for name in sorted(set(a) | set(b)):
    if name not in a or name not in b:
      problems.append(f'{name}: only in one record')
      continue
    ra, rb = a[name], b[name]
    if ra['step'] != rb['step']:
      problems.append(f"{name}: final step {ra['step']} vs {rb['step']}")
    for i, (ma, mb) in enumerate(zip(ra['metrics'], rb['metrics'])):
      keys = sorted(set(ma) | set(mb))
      diff = [k for k in keys if ma.get(k) != mb.get(k)]
      if diff:
        problems.append(f'{name}: step row {i}: ' + ', '.join(
            f'{k} {ma.get(k)!r} vs {mb.get(k)!r}' for k in diff))
        break
    if len(ra['metrics']) != len(rb['metrics']):
      problems.append(f"{name}: {len(ra['metrics'])} vs {len(rb['metrics'])} metric rows")
    sa, sb = ra['state'], rb['state']
    if set(sa) != set(sb):
      problems.append(f'{name}: state leaves differ: only before {sorted(set(sa) - set(sb))[:5]},'
                      f' only after {sorted(set(sb) - set(sa))[:5]}')
    changed = [k for k in sorted(set(sa) & set(sb)) if sa[k] != sb[k]]
    if changed:
      problems.append(f'{name}: {len(changed)} arrays differ, e.g. {changed[:5]}')
  return problems


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--configs', nargs='+', default=list(CONFIGS))
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--repo', default=os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))), help='the checkout whose jaxdet to run (default: this one)')
  parser.add_argument('--out', required=True, help='where to write the record (JSON)')
  parser.add_argument('--compare', help='a record to compare with (exit 1 on any difference)')
  args = parser.parse_args()
  result = {}
  for name in args.configs:
    result[name] = record(name, args.steps, args.repo)
    last = result[name]['metrics'][-1]
    print(f"{name}: {len(result[name]['metrics'])} steps, last loss {last.get('loss')!r}, "
          f"{len(result[name]['state'])} arrays hashed", flush=True)
  with open(args.out, 'w') as f:
    json.dump(result, f, indent=1, sort_keys=True)
  if args.compare:
    with open(args.compare) as f:
      before = json.load(f)
    problems = compare({k: v for k, v in before.items() if k in result}, result)
    print('\n'.join(problems) if problems else
          f'bit-identical: {", ".join(sorted(result))} ({args.steps} steps: every logged metric '
          'and every state array)')
    sys.exit(1 if problems else 0)


if __name__ == '__main__':
  main()
