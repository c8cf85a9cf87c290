"""Loaders from ``config.data`` (see ``configs/_base_/data.py``)."""
import logging

import numpy as np

from jaxdet.data import transforms as T
from jaxdet.data.loader.batch import check_positive
from jaxdet.data.loader.eval_loader import EvalLoader
from jaxdet.data.loader.index import index_info
from jaxdet.data.loader.train_loader import TrainLoader

log = logging.getLogger(__name__)


def _image_dtype(pipeline):
  if pipeline.get("kind", "standard") == "ssd" and not pipeline.get("photometric_uint8", True):
    return np.float32
  return np.uint8


def _devices(num_devices):
  if num_devices is None:
    import jax  # pylint: disable=import-outside-toplevel
    num_devices = jax.local_device_count()
  return num_devices


def _process(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    process_index, process_count = jax.process_index(), jax.process_count()
  return process_index, process_count


def build_train_loader(data, source, *, seed=0, num_devices=None, num_epochs=None,
                       process_index=None, process_count=None, info=None):
  """`TrainLoader` from the ``config.data`` ConfigDict (see ``configs/_base_/data.py``)."""
  p = data.pipeline
  process_index, process_count = _process(process_index, process_count)
  return TrainLoader(
      source, T.build_train_transform(p, tuple(data.img_scale)),
      buckets=T.bucket_shapes(p, tuple(data.img_scale), train=True,
                              buckets=data.get("buckets", ())),
      samples_per_gpu=data.samples_per_gpu, num_devices=_devices(num_devices),
      max_gt=data.max_gt, seed=seed, num_workers=data.workers_per_gpu,
      prefetch=data.get("prefetch", 2), size_divisor=p.get("size_divisor", 32),
      min_box_size=p.get("min_box_size", 1.0), num_epochs=num_epochs,
      process_index=process_index, process_count=process_count,
      image_dtype=_image_dtype(p), info=info, repeat=_repeat(data))


def _repeat(data):
  repeat = data.get("repeat", 1)
  check_positive(**{"data.repeat": repeat})
  return repeat


TEST_PADDING = ('exact', 'buckets')


def eval_padding(data):
  """``data.test_padding`` ('exact' when unset); a one-line ValueError unless one of
  `TEST_PADDING`."""
  mode = data.get("test_padding", "exact")
  if mode not in TEST_PADDING:
    raise ValueError(f"data.test_padding={mode!r}: expected one of {TEST_PADDING}")
  return mode


def eval_shapes(data, info):
  """(shapes, shape_of): the padded (H, W) shapes of the test batches and each record's index
  into them, from the records' original sizes (``info``, an `IndexInfo`) alone.

  ``data.test_padding`` 'exact' (default): each image padded as mmdetection pads it at test time
  (its resized size rounded up to ``pipeline.size_divisor``; SSD's fixed size: one shape);
  'buckets': the run's buckets (``data.buckets`` / `transforms.bucket_shapes`). See
  `jaxdet.data.transforms.padding`.
  """
  p, scale = data.pipeline, tuple(data.img_scale)
  mode = eval_padding(data)
  if mode == "buckets":
    shapes = T.bucket_shapes(p, scale, train=False, buckets=data.get("buckets", ()))
    return shapes, np.array([T.choose_bucket(h, w, shapes)
                             for h, w in zip(info.heights, info.widths)], np.int64)
  padded = T.exact_test_shapes(T.eval_resize(p, scale), p.get("size_divisor", 32),
                               info.heights, info.widths)
  shapes, shape_of = np.unique(padded.reshape(-1, 2), axis=0, return_inverse=True)
  return [tuple(int(v) for v in s) for s in shapes], shape_of.reshape(-1).astype(np.int64)


def build_eval_loader(data, source, *, num_devices=None, process_index=None,
                      process_count=None, info=None):
  """`EvalLoader` from ``config.data`` (batch ``data.val.samples_per_gpu``), padded as
  ``data.test_padding`` says (`eval_shapes`); logs the number of shapes (= programs)."""
  p = data.pipeline
  process_index, process_count = _process(process_index, process_count)
  info = info if info is not None else index_info(source)
  shapes, shape_of = eval_shapes(data, info)
  log.info("test-time padding %r (size divisor %d): %d image shape(s) from the image sizes, "
           "each compiled once", eval_padding(data), p.get("size_divisor", 32), len(shapes))
  return EvalLoader(
      source, T.build_test_transform(p, tuple(data.img_scale)), buckets=shapes,
      bucket_of=shape_of, samples_per_gpu=data.val.get("samples_per_gpu", data.samples_per_gpu),
      num_devices=_devices(num_devices), max_gt=data.max_gt,
      num_workers=data.workers_per_gpu, prefetch=data.get("prefetch", 2),
      size_divisor=p.get("size_divisor", 32), process_index=process_index,
      process_count=process_count, image_dtype=np.uint8, info=info)


def count_programs(data, *, num_devices, train=True):
  """Upper bound on the distinct batch shapes (= jit programs) from the config alone: one per
  bucket, or at test time with ``data.test_padding='exact'`` every shape keep-ratio resizing can
  pad to (`transforms.padding.possible_test_shapes`; 83 for (1333, 800) and divisor 32).
  `TrainLoader.shapes` / `EvalLoader.shapes` give the exact list for a given dataset."""
  check_positive(num_devices=num_devices)
  if not train and eval_padding(data) == "exact":
    p = data.pipeline
    return len(T.possible_test_shapes(T.eval_resize(p, tuple(data.img_scale)),
                                      p.get("size_divisor", 32)))
  return len(T.bucket_shapes(data.pipeline, tuple(data.img_scale), train=train,
                             buckets=data.get("buckets", ())))
