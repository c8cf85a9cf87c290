"""Batches with static shapes from a random-access source, on grain.

Files: `index` (record sizes before decoding), `batch` (one batch; grain plumbing),
`train_loader`, `eval_loader`, `build` (loaders from ``config.data``).

``jit`` compiles one program per input shape, so every training batch is padded into one of a
few *buckets* (`jaxdet.data.transforms.bucket_shapes`: landscape and portrait at the config's
scale, multiples of ``size_divisor``) and a batch holds images of a single bucket. Evaluation
batches (``data.test_padding='exact'``, the default) hold images of one *exact* padded shape:
each image's resized size rounded up to ``size_divisor``, as mmdetection pads test images, so
that converted models give mmdetection's detections (`eval_shapes`: the shapes follow from the
annotation file's image sizes; each is compiled once). A batch is a dict of numpy arrays with
a leading device axis::

  image        (D, B, H, W, 3) uint8 RGB, zero-padded at the bottom/right
  gt_boxes     (D, B, G, 4) float32 xyxy input pixels   (G = data.max_gt; padding rows 0)
  gt_labels    (D, B, G) int32;  gt_mask (D, B, G) bool
  img_shape    (D, B, 2) int32 (h, w) after resize, before padding
  pad_shape    (D, B, 2) int32 img_shape rounded up to size_divisor (mmdet's pad_shape)
  scale_factor (D, B, 2) float32 (w, h);  offset (D, B, 2) float32;  flip (D, B) bool
  orig_size    (D, B, 2) int32 (h, w);    image_id (D, B) int32
  image_valid  (D, B) bool: False for the padding of the last evaluation batch and for images
               the source could not read (``data.skip_bad_images``); such slots are all zero
  num_gt_dropped (D, B) int32: targets beyond max_gt that did not fit (counted, reported)

Training order: epoch ``e`` is a permutation drawn from ``(seed, e)`` alone; within it the
images are grouped by bucket (like mmdet's GroupSampler: each group padded to a multiple of
the global batch by repeating its first images), and the batches of all groups are shuffled.
Batch ``j`` -- its images and every random decision of its transforms, seeded by
``(seed, j, slot)`` -- depends on nothing else, so any number of workers gives the same
stream, and an iterator's state is just the index of the next batch.

Workers: ``grain.MapDataset`` over batch indices -> ``to_iter_dataset`` (one reader thread
prefetching) -> ``mp_prefetch`` with ``num_workers`` processes (each builds whole batches;
grain interleaves them in order).
"""

# pylint: disable=unused-import
from jaxdet.data.loader.batch import BatchMaker, batch_rng, check_positive, grain_iterator
from jaxdet.data.loader.build import (TEST_PADDING, build_eval_loader, build_train_loader,
                                      count_programs, eval_padding, eval_shapes)
from jaxdet.data.loader.eval_loader import EvalBatches, EvalLoader
from jaxdet.data.loader.index import IndexInfo, index_info
from jaxdet.data.loader.train_loader import (STATE_VERSION, TrainBatches, TrainIterator,
                                             TrainLoader, TrainSchedule)
