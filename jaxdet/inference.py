"""Inference on your own images: `Detector`, a trained checkpoint behind one call.

  from jaxdet import Detector
  detector = Detector.from_checkpoint('configs/atss.py:smoke', 'work_dirs/atss_smoke')
  result = detector('photo.jpg')                 # a path, or an (H, W, 3) uint8 RGB array
  results = detector([image_a, 'b.png'])         # a list in, a list of results out
  result.boxes        (n, 4) float32 x1, y1, x2, y2 in the image's own pixels, best first
  result.scores       (n,) float32;  result.labels (n,) int32 in 0..K-1
  result.class_names  [n names], one per box;  result.image_size (h, w)
  draw_detections(image, result).save('out.png')

It runs exactly what evaluation runs: the config's test-time transform (resize), padding as
`data.test_padding` says (default 'exact': each image to the multiple of `size_divisor` above its
resized size, as mmdetection pads test images, so that a converted mmdetection checkpoint gives
mmdetection's detections; 'buckets': into `data.buckets` / `bucket_shapes`), batches of
`data.val.samples_per_gpu` images per device holding one padded shape each (`EvalLoader`), and
`predict_step` under `jax.pmap`, compiled once per padded shape and reused for every later call
(and, through JAX's persistent compilation cache in `~/.cache/jaxdet/xla`, by later processes:
see `jaxdet.evaluation.enable_compilation_cache`). Results are the evaluation path's detections
filtered by `score_thr` (scores >= it; default the config's `model.test_cfg.score_thr`, which
the model already applies to its class scores before NMS).

Class names (and the category ids `python -m jaxdet.infer` writes): see
`jaxdet.data.categories` -- the list a training run saved in its checkpoints, else the config's
dataset (shapes: its 5 classes; COCO: the annotation file's categories, or COCO's 80), else
'class_k'.
"""
import dataclasses
import functools
import logging
import os
from typing import Sequence

import jax
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from jaxdet.data import loader as data_loader
from jaxdet.data import transforms as T
from jaxdet.data.categories import config_categories
from jaxdet.data.sources import decode_image
from jaxdet.engine import checkpoint as ckpt
from jaxdet.engine import config_cli
from jaxdet.engine.steps import AXIS, predict_step
from jaxdet.engine.train_state import replicate
from jaxdet.evaluation import enable_compilation_cache
from jaxdet.models.detectors import build_detector, compute_dtype


@dataclasses.dataclass
class Detections:
  """One image's detections, best first (see the module docstring)."""
  boxes: np.ndarray
  scores: np.ndarray
  labels: np.ndarray
  class_names: list
  image_size: tuple

  def __len__(self):
    return len(self.scores)


def check_variables(detector, variables, image_shape, *, what='the checkpoint'):
  """Raises a one-line ValueError naming `what` unless `variables` fit `detector.module` (the
  same leaves and shapes as its initialisation for images of `image_shape` (B, H, W, 3))."""
  expected = detector.init_shapes(image_shape)
  expected = {k: v for k, v in expected.items() if k in ('params', 'batch_stats')}
  diff = ckpt.diff_variables(expected, {k: variables.get(k, {}) for k in expected})
  if any(diff.values()):
    hint = (' (is model.num_classes the one it was trained with?)'
            if any('conv_cls' in k for k, _, _ in diff['shape']) else
            ' (is it the same model config?)')
    raise ValueError(f'{what} does not fit the config: {ckpt.describe_diff(diff)}{hint}')


class _Images:
  """An in-memory list of images as a source for `EvalLoader` (no boxes; image_id = index)."""

  def __init__(self, images):
    self.images = images

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    image = self.images[i]
    return dict(image=image, boxes=np.zeros((0, 4), np.float32), labels=np.zeros(0, np.int32),
                crowd=np.zeros(0, bool), image_id=int(i), orig_size=tuple(image.shape[:2]))

  def index_info(self):
    n = len(self.images)
    return dict(heights=np.array([x.shape[0] for x in self.images], np.int64),
                widths=np.array([x.shape[1] for x in self.images], np.int64),
                num_targets=np.zeros(n, np.int64))


def as_rgb_array(image, name='image'):
  """A path (decoded as the data sources decode: EXIF orientation, any mode -> RGB) or an array
  (H, W, 3) / (H, W) / (H, W, 4) uint8 -> (H, W, 3) uint8. Bad input: a one-line ValueError
  naming it (`DataError` for files)."""
  if isinstance(image, (str, os.PathLike)):
    return decode_image(os.fspath(image), name=os.fspath(image))
  if isinstance(image, Image.Image):
    image = np.asarray(image.convert('RGB'))
  array = np.asarray(image)
  if array.dtype != np.uint8:
    raise ValueError(f'{name} is a {array.dtype} array; expected uint8 RGB (H, W, 3)')
  if array.ndim == 2:
    array = np.repeat(array[..., None], 3, axis=2)
  elif array.ndim == 3 and array.shape[2] == 4:
    array = array[..., :3]
  if array.ndim != 3 or array.shape[2] != 3 or min(array.shape[:2]) < 1:
    raise ValueError(f'{name} has shape {array.shape}; expected (H, W, 3) uint8 RGB')
  return array


class Detector:
  """A detector with its weights, ready for `detector(images)` (see the module docstring).

  Args:
    config: a ConfigDict, or a spec 'configs/atss.py:smoke' (with `overrides`).
    variables: {'params', 'batch_stats'} (host or device arrays) fitting `config.model`.
    dtype: compute dtype name ('float32' / 'bfloat16'); default `config.dtype`.
    score_thr: keep detections with score >= this; default `model.test_cfg.score_thr`.
    batch_size: images per device per batch; default `data.val.samples_per_gpu`.
    class_names, cat_ids: the labels' names / dataset ids; default `config_categories`.
  """

  def __init__(self, config, variables, *, dtype=None, score_thr=None, batch_size=None,
               class_names=None, cat_ids=None, overrides=(), what='the variables'):
    if isinstance(config, str):
      config = config_cli.load_config(config, overrides)
    self.config = config
    self.checkpoint = None   # 'directory/step' when made by `from_checkpoint`
    if dtype is None:
      dtype = config.get('dtype', 'float32')
    self.dtype = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    data, pipeline = config.data, config.data.pipeline
    self.model = build_detector(config.model, self.dtype)
    self.img_scale = tuple(data.img_scale)
    self.transform = T.build_test_transform(pipeline, self.img_scale)
    self.init_shape = T.bucket_shapes(pipeline, self.img_scale, train=False)[0]   # for checks
    self.size_divisor = pipeline.get('size_divisor', 32)
    self.batch_size = int(batch_size or data.val.get('samples_per_gpu', data.samples_per_gpu))
    if self.batch_size < 1:
      raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    self.num_devices = jax.local_device_count()
    check_variables(self.model, variables, (1, *self.init_shape, 3), what=what)
    data_loader.eval_padding(data)   # a bad data.test_padding fails here, not at the first call
    enable_compilation_cache()
    self.score_thr = float(config.model.test_cfg.score_thr if score_thr is None else score_thr)
    names, ids = config_categories(config)
    self.class_names = list(class_names) if class_names is not None else names
    self.cat_ids = list(cat_ids) if cat_ids is not None else ids
    k = int(config.model.num_classes)
    if len(self.class_names) != k or len(self.cat_ids) != k:
      raise ValueError(f'{len(self.class_names)} class names / {len(self.cat_ids)} category '
                       f'ids for model.num_classes={k}')
    self._predict = jax.pmap(functools.partial(
        predict_step, detector=self.model, pipeline=pipeline, dtype=compute_dtype(self.dtype)),
        axis_name=AXIS)
    self._state = replicate(dict(params=variables['params'],
                                 batch_stats=variables.get('batch_stats', {})))

  @classmethod
  def from_checkpoint(cls, config, checkpoint, *, dtype=None, score_thr=None, batch_size=None,
                      overrides=()):
    """A `Detector` from a config (ConfigDict or spec string) and a jaxdet checkpoint: a run's
    work_dir (its latest checkpoint), its `checkpoints` folder, or one step folder.

    A missing or unreadable checkpoint, or one whose tensors do not fit the config (e.g.
    another model.num_classes), is a one-line ValueError naming it.
    """
    spec = config if isinstance(config, str) else ''
    if isinstance(config, str):
      config = config_cli.load_config(config, overrides)
    variables, directory, step = ckpt.load_variables(checkpoint)
    classes = ckpt.load_extra(directory, step).get('classes') or {}
    names, ids = classes.get('names'), classes.get('cat_ids')
    if names is None or ids is None or len(names) != int(config.model.num_classes):
      names = ids = None
    what = f'checkpoint {directory}/{step}' + (f' (config {spec})' if spec else '')
    detector = cls(config, variables, dtype=dtype, score_thr=score_thr, batch_size=batch_size,
                   class_names=names, cat_ids=ids, what=what)
    detector.checkpoint = f'{directory}/{step}'
    return detector

  def __call__(self, images, *, score_thr=None):
    """Detections of one image (-> `Detections`) or of a list of them (-> a list).

    An image is a file path or an (H, W, 3) uint8 RGB array; a (N, H, W, 3) array is N images.
    `score_thr` (default the detector's) keeps detections with score >= it.
    """
    single = isinstance(images, (str, os.PathLike, Image.Image)) or (
        isinstance(images, np.ndarray) and images.ndim in (2, 3))
    items = [images] if single else list(images)
    arrays = [as_rgb_array(x, name=f'image {i}') for i, x in enumerate(items)]
    results = self.predict_arrays(arrays, score_thr=score_thr)
    return results[0] if single else results

  def batches(self, arrays: Sequence[np.ndarray]):
    """The evaluation loader's batches (dicts of (D, B, ...) numpy arrays) of `arrays`, padded
    as `data.test_padding` says (`jaxdet.data.loader.eval_shapes`)."""
    if not len(arrays):
      return []
    quiet = logging.getLogger('jaxdet.data.loader')   # no 'evaluation data: ...' line per call
    level = quiet.level
    quiet.setLevel(max(level, logging.WARNING))
    try:
      images = _Images(arrays)
      info = data_loader.index_info(images)
      shapes, shape_of = data_loader.eval_shapes(self.config.data, info)
      loader = data_loader.EvalLoader(
          images, self.transform, buckets=shapes, bucket_of=shape_of,
          samples_per_gpu=self.batch_size, num_devices=self.num_devices, max_gt=1,
          num_workers=0, size_divisor=self.size_divisor, process_index=0, process_count=1,
          info=info)
    finally:
      quiet.setLevel(level)
    return (loader.seq[j] for j in range(len(loader.seq)))

  def predict_batch(self, batch):
    """The pmapped `predict_step` on one of `batches()`: `Predictions` of (D, B, K, ...) device
    arrays (dispatched asynchronously; `jax.device_get` waits)."""
    return self._predict(self._state, batch)

  def predict_arrays(self, arrays: Sequence[np.ndarray], *, score_thr=None):
    """`Detections` of each (H, W, 3) uint8 RGB array, in order."""
    thr = self.score_thr if score_thr is None else float(score_thr)
    out = [None] * len(arrays)

    def collect(batch, pred):
      pred = jax.device_get(pred)
      flat = lambda x: np.asarray(x).reshape(-1, *np.shape(x)[2:])
      boxes, scores, labels, valid = (flat(v) for v in (pred.boxes, pred.scores, pred.labels,
                                                         pred.valid))
      for row, (index, ok) in enumerate(zip(flat(batch['image_id']), flat(batch['image_valid']))):
        if not ok:
          continue
        keep = valid[row] & (scores[row] >= thr)
        lab = labels[row][keep].astype(np.int32)
        out[int(index)] = Detections(
            boxes=boxes[row][keep].astype(np.float32), scores=scores[row][keep].astype(np.float32),
            labels=lab, class_names=[self.class_names[k] for k in lab],
            image_size=tuple(int(v) for v in arrays[int(index)].shape[:2]))

    pending = None   # dispatch batch j+1 before fetching batch j's results (overlap)
    for batch in self.batches(arrays):
      result = (batch, self.predict_batch(batch))
      if pending is not None:
        collect(*pending)
      pending = result
    if pending is not None:
      collect(*pending)
    return out


# ----------------------------------------------------------------------------- drawing

_PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
            (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
            (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
            (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128))


def colour_of(label):
  return _PALETTE[int(label) % len(_PALETTE)]


def box_outline(box, size):
  """The integer rectangle (x1, y1, x2, y2), inclusive, that `draw_detections` outlines for a
  float box in an image of `size` (h, w): rounded, clipped to the image."""
  h, w = size
  x1, y1, x2, y2 = (int(round(float(v))) for v in box)
  x1, x2 = min(max(x1, 0), w - 1), min(max(x2, 0), w - 1)
  y1, y2 = min(max(y1, 0), h - 1), min(max(y2, 0), h - 1)
  return x1, y1, max(x1, x2), max(y1, y2)


def draw_detections(image, detections, *, line_width=None, font=None):
  """A PIL RGB image of `image` ((H, W, 3) uint8 or PIL) with each box outlined in its class's
  colour and a '<class> <score>' label in a filled tag above it (inside the box when there is
  no room above). Boxes are drawn lowest score first, so the best ones end on top."""
  canvas = (image.convert('RGB').copy() if isinstance(image, Image.Image)
            else Image.fromarray(np.ascontiguousarray(as_rgb_array(image))))
  w, h = canvas.size
  width = line_width or max(1, int(round(max(h, w) / 400)))
  font = font or ImageFont.load_default()
  draw = ImageDraw.Draw(canvas)
  for k in np.argsort(np.asarray(detections.scores), kind='stable'):
    colour = colour_of(detections.labels[k])
    x1, y1, x2, y2 = box_outline(detections.boxes[k], (h, w))
    draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
    text = f'{detections.class_names[k]} {float(detections.scores[k]):.2f}'
    tl, tt, tr, tb = draw.textbbox((0, 0), text, font=font)
    tw, th = tr - tl + 2, tb - tt + 2
    ty = y1 - th if y1 - th >= 0 else y1
    draw.rectangle([x1, ty, x1 + tw, ty + th], fill=colour)
    dark = sum(colour) > 400
    draw.text((x1 + 1 - tl, ty + 1 - tt), text, fill=(0, 0, 0) if dark else (255, 255, 255),
              font=font)
  return canvas
