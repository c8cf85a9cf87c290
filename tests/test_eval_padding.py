"""Test-time padding (issue 15): each image padded as mmdetection pads it, shapes counted from the
image sizes alone; the bucketed padding kept as an option."""
import numpy as np
import pytest

from configs._base_ import data as data_config
from jaxdet.data import loader as L
from jaxdet.data import transforms as T


def _mmcv_resized(h, w, scale):
  """mmcv's keep-ratio rescale written out: factor min(long / max(h, w), short / min(h, w)),
  new side int(side * factor + 0.5)."""
  factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
  return int(h * factor + 0.5), int(w * factor + 0.5)


def _ceil(x, d):
  return -(-x // d) * d


class SizedSource:
  """Images of the given sizes (random pixels, one box each); counts the images it decodes."""

  def __init__(self, sizes, seed=0):
    rng = np.random.default_rng(seed)
    self.sizes = list(sizes)
    self.pixels = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in self.sizes]
    self.decoded = 0

  def __len__(self):
    return len(self.sizes)

  def __getitem__(self, i):
    self.decoded += 1
    h, w = self.sizes[i]
    return dict(image=self.pixels[i], boxes=np.array([[1, 2, w - 3, h - 1]], np.float32),
                labels=np.zeros(1, np.int32), crowd=np.zeros(1, bool), image_id=100 + i,
                orig_size=(h, w))

  def index_info(self):
    return dict(heights=np.array([s[0] for s in self.sizes]),
                widths=np.array([s[1] for s in self.sizes]),
                num_targets=np.ones(len(self.sizes), np.int64))


SIZES = [(24, 40), (40, 24), (32, 32), (20, 41), (30, 40), (24, 40), (41, 20), (17, 60), (24, 40)]


def _config(**kw):
  c = data_config.get_config()
  c.img_scale = (64, 40)
  c.pipeline.size_divisor = 8
  c.workers_per_gpu = 0
  c.val.samples_per_gpu = 2
  c.max_gt = 4
  c.update(kw)
  return c


def test_exact_shapes_follow_mmcv_rescale_and_the_divisor():
  src = SizedSource(SIZES)
  ev = L.build_eval_loader(_config(), src, num_devices=1, process_index=0, process_count=1)
  want = {i: tuple(_ceil(v, 8) for v in _mmcv_resized(h, w, (64, 40)))
          for i, (h, w) in enumerate(SIZES)}
  assert [s[2:4] for s in ev.shapes] == sorted(set(want.values()))
  assert src.decoded == 0   # the shapes came from the sizes alone
  seen = []
  for b in ev:
    assert b['image'].shape[:2] == (1, 2)
    hb, wb = b['image'].shape[2:4]
    for k in np.flatnonzero(b['image_valid'][0]):
      i = int(b['image_id'][0, k]) - 100
      seen.append(i)
      assert want[i] == (hb, wb)                       # a batch holds one exact shape
      nh, nw = _mmcv_resized(*SIZES[i], (64, 40))
      assert tuple(b['img_shape'][0, k]) == (nh, nw)
      assert tuple(b['pad_shape'][0, k]) == (hb, wb)
      resized = T.resize_image(src.pixels[i], (nw, nh))
      np.testing.assert_array_equal(b['image'][0, k, :nh, :nw], resized)
      assert not b['image'][0, k, nh:].any() and not b['image'][0, k, :, nw:].any()
  assert sorted(seen) == list(range(len(SIZES)))


def test_buckets_option_pads_into_the_run_buckets():
  src = SizedSource(SIZES)
  c = _config(test_padding='buckets')
  ev = L.build_eval_loader(c, src, num_devices=1, process_index=0, process_count=1)
  assert [s[2:4] for s in ev.shapes] == [(40, 64), (64, 40)]
  assert L.count_programs(c, num_devices=1, train=False) == 2
  for b in ev:
    assert b['image'].shape[2:4] in ((40, 64), (64, 40))


def test_ssd_fixed_size_is_one_shape_without_divisor():
  c = _config()
  c.pipeline.update(kind='ssd', keep_ratio=False, size_divisor=1)
  c.img_scale = (30, 30)
  shapes, shape_of = L.eval_shapes(c, L.index_info(SizedSource(SIZES)))
  assert shapes == [(30, 30)] and (shape_of == 0).all()
  assert L.count_programs(c, num_devices=1, train=False) == 1


def test_possible_shapes_bound_every_image_size():
  """(1333, 800) / 32: landscape (800, 800..1344) 18 + (32..800, 1344) 25 - 1 shared = 42,
  portrait the same, the square one shared: 83."""
  resize = T.Resize((1333, 800))
  possible = T.possible_test_shapes(resize, 32)
  assert len(possible) == 83 and (800, 1216) in possible and (1152, 800) in possible
  rng = np.random.default_rng(0)
  h = rng.integers(40, 3000, 20000)
  w = np.clip((h * np.exp(rng.uniform(-1.5, 1.5, h.size))).astype(int), 40, 4000)
  got = T.exact_test_shapes(resize, 32, h, w)
  for (hh, ww), (gh, gw) in zip(zip(h[:500], w[:500]), got[:500]):
    nh, nw = _mmcv_resized(hh, ww, (1333, 800))
    assert (gh, gw) == (_ceil(nh, 32), _ceil(nw, 32))
  assert set(map(tuple, got.tolist())) <= set(possible)
  c = data_config.get_config()
  assert L.count_programs(c, num_devices=1, train=False) == 83
  assert L.count_programs(c, num_devices=1, train=True) == 2


def test_bad_test_padding_is_a_one_line_error():
  with pytest.raises(ValueError, match=r"^data.test_padding='bucket': expected one of"):
    L.build_eval_loader(_config(test_padding='bucket'), SizedSource(SIZES), num_devices=1,
                        process_index=0, process_count=1)
  with pytest.raises(ValueError, match='bucket_of must give each of the 9 records'):
    L.EvalLoader(SizedSource(SIZES), T.build_test_transform(_config().pipeline, (64, 40)),
                 buckets=[(40, 64)], bucket_of=[0, 1] * 4 + [0], samples_per_gpu=1,
                 num_devices=1, max_gt=2)


_CACHE_RUN = '''
import logging, sys
import jax, jax.numpy as jnp
from jaxdet.evaluation import enable_compilation_cache
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")
logging.getLogger("jax._src.compiler").setLevel(logging.DEBUG)
print("DIR", enable_compilation_cache(), jax.config.jax_compilation_cache_dir)
f = jax.pmap(lambda x: jnp.tanh(x @ x.T).sum(), axis_name="i")
print("OUT", float(f(jnp.ones((1, 8, 8)))[0]))
'''


def test_persistent_compilation_cache_second_process_compiles_nothing(tmp_path):
  """`enable_compilation_cache`: a second process reads every program from the folder
  (JAXDET_COMPILATION_CACHE); '' turns it off; JAX's own setting is left alone."""
  import os  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel

  def run(cache):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(('JAX_COMPILATION_CACHE', 'JAX_PERSISTENT_CACHE'))}
    env.update(JAX_PLATFORMS='cpu', JAXDET_COMPILATION_CACHE=cache)
    out = subprocess.run([sys.executable, '-c', _CACHE_RUN], env=env, capture_output=True,
                         text=True, check=True).stdout
    return (out, out.count('PERSISTENT COMPILATION CACHE MISS'),
            out.count('Persistent compilation cache hit'))

  cache = str(tmp_path / 'xla')
  first, misses, _ = run(cache)
  assert f'DIR {cache} {cache}' in first and misses >= 1 and os.listdir(cache)
  second, misses, hits = run(cache)
  assert misses == 0 and hits >= 1
  assert first.split('OUT')[1] == second.split('OUT')[1]
  off, _, hits = run('')
  assert 'DIR None None' in off and hits == 0
  import jax  # pylint: disable=import-outside-toplevel
  from jaxdet.evaluation import enable_compilation_cache  # pylint: disable=import-outside-toplevel
  before = jax.config.jax_compilation_cache_dir
  if before:   # tests/conftest.py sets JAX_COMPILATION_CACHE_DIR: left as it is
    assert enable_compilation_cache(str(tmp_path / 'other')) == before
    assert jax.config.jax_compilation_cache_dir == before
