"""The README's models table, regenerated from the configs and the recorded measurements.

  python experiments/models_table.py              # rewrite the table in README.md
  python experiments/models_table.py --check      # exit 1 if README.md's table is stale
  python experiments/models_table.py --record-smoke configs/retinanet.py:smoke WORK_DIR WALL_S
  python experiments/models_table.py --record-cpu configs/retinanet.py IMG_S

Parameters come from the configs themselves (`jaxdet.info.count_params`, shape-only); smoke mAP
and CPU img/s from `experiments/results.json`, which the two `--record-*` commands fill from a
finished smoke run's `metrics.jsonl` (its last COCO evaluation) and from `bench_train.py`'s line.
The paper and mmdetection's COCO box AP (model zoo, REFERENCE.md) are the only typed facts.
"""
import argparse
import datetime
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
README = os.path.join(ROOT, 'README.md')
RESULTS = os.path.join(ROOT, 'experiments', 'results.json')
BEGIN, END = '<!-- models-table: begin -->', '<!-- models-table: end -->'

# config, detector, paper, mmdetection's COCO val2017 box AP for that config
MODELS = (
    ('configs/atss.py', 'ATSS R50-FPN 1x',
     '[Zhang et al. 2020](https://arxiv.org/abs/1912.02424)', 39.4),
    ('configs/atss_r101.py', 'ATSS R101-FPN 1x',
     '[Zhang et al. 2020](https://arxiv.org/abs/1912.02424)', 41.5),
    ('configs/retinanet.py', 'RetinaNet R50-FPN 1x',
     '[Lin et al. 2017](https://arxiv.org/abs/1708.02002)', 36.5),
    ('configs/fcos.py', 'FCOS R50-caffe-FPN GN-head 1x',
     '[Tian et al. 2019](https://arxiv.org/abs/1904.01355)', 36.6),
    ('configs/fcos_mstrain.py', 'FCOS R50-caffe-FPN GN-head ms-640-800 2x',
     '[Tian et al. 2019](https://arxiv.org/abs/1904.01355)', 38.5),
    ('configs/nas_fcos.py', 'NAS-FCOS R50-caffe NAS-FPN NAS-head 1x',
     '[Wang et al. 2020](https://arxiv.org/abs/1906.04423)', 39.4),
    ('configs/ssd300.py', 'SSD300 VGG16 120e',
     '[Liu et al. 2016](https://arxiv.org/abs/1512.02325)', 25.5),
    ('configs/ssd512.py', 'SSD512 VGG16 120e',
     '[Liu et al. 2016](https://arxiv.org/abs/1512.02325)', 29.5),
    ('configs/detr.py', 'DETR R50 150e',
     '[Carion et al. 2020](https://arxiv.org/abs/2005.12872)', 39.9),
)


def load_results():
  if not os.path.exists(RESULTS):
    return {'smoke': {}, 'cpu_train': {}}
  with open(RESULTS) as f:
    return json.load(f)


def save_results(results):
  tmp = RESULTS + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(results, f, indent=1, sort_keys=True)
    f.write('\n')
  os.replace(tmp, RESULTS)


def record_smoke(spec, work_dir, wall_s):
  """Stores the last COCO evaluation of a finished smoke run under `spec`."""
  with open(os.path.join(work_dir, 'metrics.jsonl')) as f:
    evals = [r for r in map(json.loads, f) if r.get('kind') == 'eval']
  if not evals:
    raise SystemExit(f'{work_dir}/metrics.jsonl has no COCO evaluation')
  last = evals[-1]
  results = load_results()
  results['smoke'][spec] = dict({k: round(last[k], 4) for k in ('mAP', 'AP50', 'AP75')},
                                step=last['step'], wall_s=float(wall_s),
                                date=str(datetime.date.today()))
  save_results(results)


def record_cpu(spec, img_s):
  results = load_results()
  results['cpu_train'][spec] = dict(img_s=float(img_s), date=str(datetime.date.today()),
                                    setting='512x512 batch 2 fp32, experiments/bench_train.py')
  save_results(results)


def table():
  from jaxdet import info  # pylint: disable=import-outside-toplevel
  from jaxdet.engine import config_cli  # pylint: disable=import-outside-toplevel
  results = load_results()
  lines = ['| config | detector | paper | mmdet COCO box AP | parameters | smoke mAP (wall on the '
           '2-core CPU) | CPU train img/s (512x512, b2) |', '|---|---|---|---|---|---|---|']
  for spec, name, paper, ap in MODELS:
    if not os.path.exists(os.path.join(ROOT, spec)):
      continue
    counts = info.count_params(config_cli.load_config(os.path.join(ROOT, spec)))
    smoke = results['smoke'].get(spec + ':smoke')
    smoke_cell = (f"{smoke['mAP']:.3f} ({smoke['wall_s'] / 60:.1f} min)" if smoke else '-')
    cpu = results['cpu_train'].get(spec)
    cpu_cell = f"{cpu['img_s']:.2f}" if cpu else '-'
    lines.append(f"| `{spec}` | {name} | {paper} | {ap} | {counts['total']:,} | {smoke_cell} | "
                 f"{cpu_cell} |")
  return '\n'.join(lines)


def with_table(text, new_table):
  if BEGIN not in text or END not in text:
    raise SystemExit(f'README.md lacks the {BEGIN} / {END} markers')
  head, rest = text.split(BEGIN, 1)
  _, tail = rest.split(END, 1)
  return f'{head}{BEGIN}\n{new_table}\n{END}{tail}'


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--check', action='store_true')
  p.add_argument('--record-smoke', nargs=3, metavar=('SPEC', 'WORK_DIR', 'WALL_S'))
  p.add_argument('--record-cpu', nargs=2, metavar=('CONFIG', 'IMG_S'))
  args = p.parse_args()
  if args.record_smoke:
    record_smoke(*args.record_smoke)
  if args.record_cpu:
    record_cpu(*args.record_cpu)
  with open(README) as f:
    text = f.read()
  new = with_table(text, table())
  if args.check:
    if new != text:
      print('README.md: the models table is stale; run python experiments/models_table.py')
      sys.exit(1)
    print('README.md: the models table is up to date')
    return
  if new != text:
    with open(README, 'w') as f:
      f.write(new)
  print(table())


if __name__ == '__main__':
  main()
