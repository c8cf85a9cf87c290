"""The grain loader: static shapes, device axis, seeded order, resumable state, evaluation."""
import json

import numpy as np
import pytest
from PIL import Image

from configs._base_ import data as data_config
from jaxdet.data import loader as L
from jaxdet.data import transforms as T
from jaxdet.data.loader.train_loader import TrainSchedule


class ListSource:
  """In-memory source in the agreed record format; landscape, portrait and square images.

  Record 4 has no boxes and record 7 only a crowd box: neither is a training image.
  """

  def __init__(self, n=13, seed=0):
    rng = np.random.default_rng(seed)
    self.records = []
    for i in range(n):
      h, w = [(24, 40), (40, 24), (32, 32)][i % 3]
      k = 0 if i == 4 else int(rng.integers(1, 6))
      xy = rng.uniform(0, [w * 0.6, h * 0.6], (k, 2))
      wh = rng.uniform(2, [w * 0.4, h * 0.4], (k, 2))
      crowd = np.zeros(k, bool)
      if i == 7:
        crowd[:] = True
      elif k > 2:
        crowd[0] = True
      self.records.append(dict(
          image=rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
          boxes=np.concatenate([xy, xy + wh], 1).astype(np.float32),
          labels=rng.integers(0, 3, k).astype(np.int32), crowd=crowd,
          image_id=1000 + 3 * i, orig_size=(h, w)))
    self.by_id = {r["image_id"]: r for r in self.records}

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    return self.records[i]


def _targets(rec):
  b = rec["boxes"]
  keep = ~rec["crowd"] & (b[:, 2] - b[:, 0] >= 1) & (b[:, 3] - b[:, 1] >= 1)
  return b[keep], rec["labels"][keep]


def _config(**kw):
  c = data_config.get_config()
  c.img_scale = (64, 40)  # 24 x 40 -> 38 x 64, 40 x 24 -> 64 x 38, 32 x 32 -> 40 x 40
  c.pipeline.size_divisor = 8  # buckets (40, 64) and (64, 40)
  c.workers_per_gpu = 0
  c.samples_per_gpu = 2
  c.max_gt = 8
  c.update(kw)
  return c


def _train(source=None, num_devices=2, seed=0, **kw):
  return L.build_train_loader(_config(**kw), source or ListSource(), seed=seed,
                              num_devices=num_devices, process_index=0, process_count=1)


def _equal(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def loader():
  return _train()


def test_static_shapes_and_device_axis(loader):
  assert loader.shapes == [(2, 2, 40, 64, 3), (2, 2, 64, 40, 3)] and loader.num_programs == 2
  assert L.count_programs(_config(), num_devices=2) == 2
  seen = set()
  for j in range(loader.batches_per_epoch):
    b = loader.batch(j)
    seen.add(b["image"].shape)
    assert b["image"].dtype == np.uint8
    assert b["gt_boxes"].shape == (2, 2, 8, 4) and b["gt_labels"].shape == (2, 2, 8)
    assert b["gt_mask"].dtype == bool and b["img_shape"].shape == (2, 2, 2)
    for k in ("flip", "image_id", "image_valid", "num_gt_dropped"):
      assert b[k].shape == (2, 2)
    assert b["image_valid"].all()
    assert (b["pad_shape"] % 8 == 0).all() and (b["pad_shape"] >= b["img_shape"]).all()
  assert seen == set(loader.shapes)


def test_batch_contents_map_back_to_the_source(loader):
  src = ListSource()
  flips = set()
  for j in range(loader.batches_per_epoch):
    b = loader.batch(j)
    for d in range(2):
      for s in range(2):
        rec = src.by_id[int(b["image_id"][d, s])]
        meta = {k: b[k][d, s] for k in ("scale_factor", "offset", "flip", "img_shape")}
        boxes, labels = _targets(rec)
        m = b["gt_mask"][d, s]
        np.testing.assert_allclose(T.boxes_to_original(b["gt_boxes"][d, s][m], meta), boxes,
                                   atol=1e-3)
        np.testing.assert_array_equal(b["gt_labels"][d, s][m], labels)
        # the image: an independent Pillow resize (+ mirror), zero padding around it
        h, w = b["img_shape"][d, s]
        ref = np.asarray(Image.fromarray(rec["image"]).resize((w, h), Image.BILINEAR))
        if b["flip"][d, s]:
          ref = ref[:, ::-1]
        np.testing.assert_array_equal(b["image"][d, s, :h, :w], ref)
        assert not b["image"][d, s, h:].any() and not b["image"][d, s, :, w:].any()
        assert tuple(b["orig_size"][d, s]) == rec["image"].shape[:2]
        flips.add(bool(b["flip"][d, s]))
  assert flips == {True, False}


def test_epoch_covers_every_usable_image(loader):
  src = ListSource()
  usable = {r["image_id"] for r in src.records if len(_targets(r)[0])}
  assert 1000 + 3 * 4 not in usable and 1000 + 3 * 7 not in usable
  assert loader.num_dropped_images == 2
  # usable: landscape 0 3 6 9 12 + square 2 5 8 11 (landscape bucket) = 9; portrait 1 10 = 2;
  # each group padded to a multiple of the global batch 4: 3 + 1 batches
  assert loader.batches_per_epoch == 4
  for e in range(2):
    ids = np.concatenate([loader.batch(e * 4 + j)["image_id"].ravel() for j in range(4)])
    assert set(ids.tolist()) == usable and len(ids) == 16


def test_repeat_is_mmdetections_repeat_dataset(loader):
  """data.repeat = 3: one epoch lists every usable image 3 times (9 landscape -> 27 = 7 batches of
  4, 2 portrait -> 6 = 2 batches), shuffled as one; repeat 1 is the plain epoch; 0 is refused."""
  src = ListSource()
  usable = [r["image_id"] for r in src.records if len(_targets(r)[0])]
  tripled = _train(repeat=3)
  assert tripled.batches_per_epoch == 9
  ids = np.concatenate([tripled.batch(j)["image_id"].ravel() for j in range(9)])
  counts = {i: int(np.sum(ids == i)) for i in usable}
  assert all(c >= 3 for c in counts.values()) and set(ids.tolist()) == set(usable)
  # one shuffle over the 3 copies (not 3 passes one after another): on one bucket of 10 images
  # the first 10 of an epoch repeat some image and miss another
  schedule = TrainSchedule(np.zeros(10, np.int64), np.ones(10, bool), global_batch=5, seed=0,
                           num_buckets=1, repeat=3)
  first = schedule.epoch(0)[0].ravel()[:10]
  assert len(first) == 10 and len(set(first.tolist())) < 10
  once = _train(repeat=1)
  assert all(_equal(once.batch(j), loader.batch(j)) for j in (0, 3, 5))
  with pytest.raises(ValueError, match="data.repeat must be a positive integer, got 0"):
    _train(repeat=0)


def test_shuffle_reproducible_across_restarts_and_seeds(loader):
  again = _train()
  other = _train(seed=1)
  first = [loader.batch(j)["image_id"] for j in range(8)]
  assert all(np.array_equal(a, again.batch(j)["image_id"]) for j, a in enumerate(first))
  assert all(_equal(loader.batch(j), again.batch(j)) for j in (0, 4))
  assert any(not np.array_equal(a, other.batch(j)["image_id"]) for j, a in enumerate(first))
  epoch0 = np.concatenate(first[:4]).ravel()
  epoch1 = np.concatenate(first[4:]).ravel()
  assert not np.array_equal(epoch0, epoch1)  # a new permutation each epoch
  # the iterator yields exactly the random-access batches
  it = iter(again)
  assert all(_equal(next(it), loader.batch(j)) for j in range(5))
  assert it.epoch == 1
  it.close()


def test_max_gt_truncation_is_counted():
  src = ListSource()
  ld = _train(src, max_gt=2)
  it = iter(ld)
  expect, images = 0, 0
  for _ in range(ld.batches_per_epoch):
    b = next(it)
    for i in b["image_id"].ravel():
      n = len(_targets(src.by_id[int(i)])[0])
      expect += max(n - 2, 0)
      images += n > 2
    assert (b["gt_mask"].sum(-1) <= 2).all()
  it.close()
  assert expect > 0
  assert it.stats == dict(gt_dropped=expect, images_with_gt_dropped=images, images_skipped=0)


@pytest.mark.parametrize("consumed", [2, 4, 5])  # 4 = exactly at an epoch boundary
def test_restore_state_gives_the_next_batch(loader, consumed):
  it = iter(loader)
  for _ in range(consumed):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expect = next(it)
  it.close()
  resumed = loader.iterator(state)
  assert _equal(next(resumed), expect)
  assert _equal(next(resumed), loader.batch(consumed + 1))
  resumed.close()
  fresh = _train()  # a new process: same config, same seed
  assert _equal(next(fresh.iterator(state)), expect)


def test_worker_processes_give_the_same_stream_and_restore(loader):
  ld = _train(workers_per_gpu=2)
  it = iter(ld)
  got = [next(it) for _ in range(3)]
  state = it.get_state()
  nxt = next(it)
  it.close()
  assert all(_equal(g, loader.batch(j)) for j, g in enumerate(got))
  assert _equal(nxt, loader.batch(3))
  # the state does not depend on the worker count: resume with one worker
  resumed = _train(workers_per_gpu=1).iterator(state)
  assert _equal(next(resumed), nxt)
  resumed.close()


def test_bad_state_and_arguments(loader):
  state = iter(loader).get_state()
  with pytest.raises(ValueError, match="seed"):
    _train(seed=5).iterator(state)
  with pytest.raises(ValueError, match="samples_per_gpu"):
    _train(samples_per_gpu=0)
  empty = ListSource(3)
  for r in empty.records:
    r["crowd"][:] = True
  with pytest.raises(ValueError, match="usable box"):
    _train(empty)


def test_eval_covers_every_image_once_with_masked_padding():
  src = ListSource(10)
  c = _config()
  c.val.samples_per_gpu = 3
  c.pipeline.size_divisor = 1  # eval buckets (40, 64) and (64, 40) as well
  c.test_padding = "buckets"
  ev = L.build_eval_loader(c, src, num_devices=1, process_index=0, process_count=1)
  assert ev.shapes == [(1, 3, 40, 64, 3), (1, 3, 64, 40, 3)]
  ids, order = [], []
  for b in ev:
    v = b["image_valid"]
    ids += b["image_id"][v].tolist()
    order.append(b["image_id"][v])
    assert not b["image"][~v].any() and not b["gt_mask"][~v].any()
    assert (b["image_id"][~v] == -1).all() and not b["flip"].any()
    for i, boxes, m, sf in zip(b["image_id"][v], b["gt_boxes"][v], b["gt_mask"][v],
                               b["scale_factor"][v]):
      rec = src.by_id[int(i)]
      np.testing.assert_allclose(boxes[m] / np.tile(sf, 2), rec["boxes"][~rec["crowd"]],
                                 atol=1e-3)
  assert sorted(ids) == sorted(r["image_id"] for r in src.records)  # every image exactly once
  assert len(ids) == len(set(ids))
  assert len(ev) == 3 + 1  # landscape + square 0 2 3 5 6 8 9 -> 3 batches; portrait 1 4 7 -> 1
  assert all((np.diff(o) > 0).all() for o in order)  # index order within a bucket


def test_index_info_hook_avoids_decoding():
  class Counting(ListSource):
    calls = 0

    def __getitem__(self, i):
      Counting.calls += 1
      return super().__getitem__(i)

    def index_info(self):
      hs, ws, nt = zip(*[(r["image"].shape[0], r["image"].shape[1], len(_targets(r)[0]))
                         for r in self.records])
      return dict(heights=hs, widths=ws, num_targets=nt)

  src = Counting()
  ld = L.build_train_loader(_config(), src, num_devices=1, process_index=0, process_count=1)
  assert Counting.calls == 0 and ld.num_dropped_images == 2


def test_unreadable_records_become_invalid_slots():
  class Broken(ListSource):
    def __getitem__(self, i):
      return None if i == 3 else super().__getitem__(i)  # skip_bad_images gives None

    def index_info(self):  # from the annotations, as CocoSource's
      return L.index_info(ListSource())

  ld = _train(Broken())
  it = iter(ld)
  batches = [next(it) for _ in range(ld.batches_per_epoch)]
  it.close()
  invalid = sum(int((~b["image_valid"]).sum()) for b in batches)
  assert it.stats["images_skipped"] == invalid >= 1  # (group padding may repeat an image)
  assert 1000 + 3 * 3 not in np.concatenate([b["image_id"].ravel() for b in batches])
  bad = [b for b in batches if not b["image_valid"].all()][0]
  v = bad["image_valid"]
  assert not bad["image"][~v].any() and not bad["gt_mask"][~v].any()
  assert (bad["image_id"][~v] == -1).all()


def test_multi_host_processes_split_each_global_batch(loader):
  hosts = [L.build_train_loader(_config(), ListSource(), seed=0, num_devices=1,
                                process_index=p, process_count=2) for p in range(2)]
  assert hosts[0].batches_per_epoch == loader.batches_per_epoch
  for j in (0, 1, 5):
    parts = [h.batch(j) for h in hosts]
    joined = {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}
    assert _equal(joined, loader.batch(j))  # same images, same augmentation, split by host
