"""The README's Python example runs, and prints what the dense ATSS path counts independently."""
import contextlib
import io
import os
import re

import numpy as np

from jaxdet.assigners import atss_assign_dense
from jaxdet.priors import level_counts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_example_runs_and_counts_positives():
  text = open(os.path.join(ROOT, 'README.md')).read()
  blocks = re.findall(r'```python\n(.*?)```', text, re.S)
  example = [b for b in blocks if 'atss_assign' in b]
  assert len(example) == 1
  out, scope = io.StringIO(), {}
  with contextlib.redirect_stdout(out):
    exec(compile(example[0], 'README.md', 'exec'), scope)  # pylint: disable=exec-used
  printed = [int(v) for v in re.findall(r'\d+', out.getvalue())]
  assert len(printed) == 1 and 1 <= printed[0] <= 45   # at most topk=9 per level
  dense = atss_assign_dense(scope['anchors'], scope['boxes'][0], np.array([3, 0]),
                            np.array([True, False]), level_counts(scope['sizes']))
  assert printed[0] == int((np.asarray(dense.gt_index) >= 0).sum())


def test_models_table_is_generated_from_configs_and_records():
  """README's models table equals what experiments/models_table.py computes (parameter counts
  from the configs, smoke mAP / CPU img/s from experiments/results.json)."""
  import subprocess
  import sys
  out = subprocess.run([sys.executable, os.path.join(ROOT, 'experiments', 'models_table.py'),
                        '--check'], capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout + out.stderr
