"""Loaders from ``config.data`` (see ``configs/_base_/data.py``)."""
import numpy as np

from jaxdet.data import transforms as T
from jaxdet.data.loader.batch import check_positive
from jaxdet.data.loader.eval_loader import EvalLoader
from jaxdet.data.loader.train_loader import TrainLoader


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
      image_dtype=_image_dtype(p), info=info)


def build_eval_loader(data, source, *, num_devices=None, process_index=None,
                      process_count=None, info=None):
  """`EvalLoader` from ``config.data`` (batch ``data.val.samples_per_gpu``)."""
  p = data.pipeline
  process_index, process_count = _process(process_index, process_count)
  return EvalLoader(
      source, T.build_test_transform(p, tuple(data.img_scale)),
      buckets=T.bucket_shapes(p, tuple(data.img_scale), train=False,
                              buckets=data.get("buckets", ())),
      samples_per_gpu=data.val.get("samples_per_gpu", data.samples_per_gpu),
      num_devices=_devices(num_devices), max_gt=data.max_gt,
      num_workers=data.workers_per_gpu, prefetch=data.get("prefetch", 2),
      size_divisor=p.get("size_divisor", 32), process_index=process_index,
      process_count=process_count, image_dtype=np.uint8, info=info)


def count_programs(data, *, num_devices, train=True):
  """Upper bound on the distinct batch shapes (= jit programs) from the config alone:
  one per bucket. `TrainLoader.shapes` gives the exact list for a given dataset."""
  check_positive(num_devices=num_devices)
  return len(T.bucket_shapes(data.pipeline, tuple(data.img_scale), train=train,
                             buckets=data.get("buckets", ())))
