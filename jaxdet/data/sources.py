"""Data sources: files on disk -> one record per image.

A *source* is a random-access object: ``len(source)`` and ``source[i] -> record``. It works
as a grain ``RandomAccessDataSource`` and pickles cheaply for grain's worker processes
(files are opened lazily, in the process that reads them). Attributes:

  class_names: list of K category names; label ``k`` is ``class_names[k]``.
  cat_ids:     list of K original category ids; ``cat_ids[label]`` goes back to COCO.
  image_ids:   list of the original image ids, index-aligned with ``source[i]``.
  coco:        a pycocotools ``COCO`` ground truth for evaluation (built lazily).

A record is a dict::

  image:     uint8 (H, W, 3) RGB (gray, palette, RGBA, CMYK and 16-bit files are converted)
  boxes:     float32 (n, 4) xyxy in original pixels, clipped to the image; boxes with zero
             area after clipping, or narrower / lower than 1 px before (as mmdetection's
             CocoDataset), are dropped
  labels:    int32 (n,) in 0..K-1
  crowd:     bool (n,); crowd boxes stay in the record (the transforms drop them as
             targets; pycocotools uses them to ignore detections in evaluation)
  image_id:  int, the original image id
  orig_size: (h, w) ints, the decoded image's size

``source.annotations(i)`` gives the same record without ``image`` and without decoding it, and
``source.index_info()`` gives ``dict(heights, widths, num_targets)`` as (N,) arrays (original
sizes; non-crowd boxes >= 1 px wide and high) so that the loader can bucket images and drop
those without targets before reading any pixels (TFDS: one pass over the split, no decoding).

With ``skip_bad_images=True`` a record whose image cannot be decoded is logged and returned
as ``None``; consumers filter it out (grain: ``MapDataset.filter(lambda r: r is not None)``).
With ``skip_bad_images=False`` it raises ``DataError``. Images listed in a COCO file but
missing on disk are found when the source is built: an error, or dropped with a warning.

Every problem with the input is a ``DataError`` (a ``ValueError``) with a one-line message
naming the file, key or value.
"""
import io
import json
import logging
import operator
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

# The 80 category ids of COCO 2017 in label order (TFDS ``coco`` stores labels 0..79 only).
COCO80_IDS = (list(range(1, 12)) + list(range(13, 26)) + [27, 28] + list(range(31, 45)) +
              list(range(46, 66)) + [67, 70] + list(range(72, 83)) + list(range(84, 91)))


_WARNED = set()   # paths already warned about in this process (one warning each)


class DataError(ValueError):
  """Bad input data; the message is one line naming the file, key or value."""


# ----------------------------------------------------------------------------- images

def _to_rgb(image):
  """A PIL image of any mode -> uint8 (H, W, 3) RGB numpy array.

  16-bit and 32-bit modes keep their 8 high bits (as OpenCV's IMREAD_COLOR, which
  mmdetection uses); alpha is dropped without compositing; EXIF orientation is applied
  (as mmcv / detectron2 do).
  """
  image = ImageOps.exif_transpose(image)
  if image.mode == 'RGB':
    return np.asarray(image, np.uint8)
  if image.mode in ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I'):
    array = np.asarray(image).astype(np.int64)
    if image.mode == 'I' and array.max(initial=0) <= 255:
      gray = array.astype(np.uint8)         # an 8-bit image stored as 32-bit int
    else:
      gray = (np.clip(array, 0, 65535) >> 8).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)
  if image.mode == 'F':
    gray = np.clip(np.round(np.asarray(image)), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)
  if image.mode == 'P' and 'transparency' in image.info:
    image = image.convert('RGBA')
  return np.asarray(image.convert('RGB'), np.uint8)


def decode_image(data, *, name):
  """Decodes an image file path or encoded bytes into uint8 (H, W, 3) RGB.

  Raises ``DataError`` naming ``name`` when the file is missing, truncated or not an image.
  """
  try:
    source = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    with Image.open(source) as image:
      image.load()   # decode now: truncated files fail here, not later
      return _to_rgb(image)
  except FileNotFoundError:
    raise DataError(f'image file not found: {name}') from None
  except UnidentifiedImageError:
    raise DataError(f'not a readable image (corrupt or unknown format): {name}') from None
  except (OSError, SyntaxError, ValueError) as e:
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise DataError(f'cannot decode image {name}: {message}') from None


def _index_info(sizes, boxes, crowd, offsets):
  """dict(heights, widths, num_targets) of (N,) arrays; a target is a non-crowd box >= 1 px
  wide and high. ``boxes (A, 4)`` of all images, image ``i``'s at ``offsets[i]:offsets[i+1]``."""
  wh = boxes[:, 2:] - boxes[:, :2]
  target = ~crowd & (wh[:, 0] >= 1) & (wh[:, 1] >= 1)
  owner = np.repeat(np.arange(len(sizes)), np.diff(offsets))
  num_targets = np.bincount(owner[target], minlength=len(sizes)).astype(np.int64)
  return dict(heights=sizes[:, 0].astype(np.int64), widths=sizes[:, 1].astype(np.int64),
              num_targets=num_targets)


def _clip_and_filter(boxes, keep, height, width):
  """Clips xyxy ``boxes (n, 4)`` to the image and clears ``keep`` where the area is 0."""
  boxes = boxes.copy()
  boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, width)
  boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, height)
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  return boxes, keep & (area > 0)


# ----------------------------------------------------------------------------- COCO

def _read_coco_json(ann_file):
  if not os.path.exists(ann_file):
    raise DataError(f'annotation file not found: {ann_file}')
  try:
    with open(ann_file, 'rb') as f:
      return json.loads(f.read())
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f'cannot read annotation file {ann_file}: {e}') from None
  except json.JSONDecodeError as e:
    raise DataError(f'annotation file {ann_file} is not valid JSON: {e}') from None


def _not_coco(ann_file, message):
  return DataError(f'{ann_file} is not a COCO detection file: {message}')


def _check_coco_structure(data, ann_file):
  """Raises ``DataError`` naming the first entry that does not fit COCO's detection format."""
  if not isinstance(data, dict):
    raise _not_coco(ann_file, f'top level is a {type(data).__name__}, not an object')
  for key in ('images', 'categories'):
    if key not in data:
      raise _not_coco(ann_file, f'no "{key}" key (keys: {sorted(data)[:8]})')
    if not isinstance(data[key], list):
      raise _not_coco(ann_file, f'"{key}" is not a list')
  if not isinstance(data.get('annotations', []), list):
    raise _not_coco(ann_file, '"annotations" is not a list')
  for cat in data['categories']:
    if not (isinstance(cat, dict) and isinstance(cat.get('id'), int) and 'name' in cat):
      raise _not_coco(ann_file, f'category {str(cat)[:80]} lacks an integer "id" or a "name"')
  number = (int, float)
  for img in data['images']:
    if not (isinstance(img, dict) and isinstance(img.get('id'), int)
            and isinstance(img.get('file_name'), str)):
      raise _not_coco(ann_file, f'image {str(img)[:80]} lacks an integer "id" or a "file_name"')
    if not (isinstance(img.get('width'), number) and isinstance(img.get('height'), number)):
      raise _not_coco(ann_file, f'image id {img["id"]} lacks "width" / "height"')
  for ann in data.get('annotations', []):
    if not (isinstance(ann, dict) and 'image_id' in ann and 'category_id' in ann):
      raise _not_coco(ann_file, f'annotation {str(ann)[:80]} lacks "image_id" or "category_id"')
    bbox = ann.get('bbox')
    if not (isinstance(bbox, list) and len(bbox) == 4 and isinstance(bbox[0], number)
            and isinstance(bbox[1], number) and isinstance(bbox[2], number)
            and isinstance(bbox[3], number)):
      raise _not_coco(ann_file, f'annotation id {ann.get("id")} has bbox {str(bbox)[:60]}, '
                      'not [x, y, w, h]')


class CocoSource:
  """A COCO-format annotation file plus an image folder (see the module docstring).

  Labels are the categories sorted by id (mmdetection's order for COCO); images keep the
  file's order. ``skip_bad_images`` drops images missing on disk (with a warning) and makes
  ``source[i]`` return ``None`` for images that cannot be decoded.
  """

  def __init__(self, ann_file, img_dir, *, skip_bad_images=False):
    self.ann_file = os.fspath(ann_file)
    self.img_dir = os.fspath(img_dir)
    self.skip_bad_images = bool(skip_bad_images)
    self._coco = None
    data = _read_coco_json(self.ann_file)
    _check_coco_structure(data, self.ann_file)
    if not data['categories']:
      raise DataError(f'{self.ann_file} has no categories')
    if not data['images']:
      raise DataError(f'{self.ann_file} lists no images: the dataset is empty')
    if not os.path.isdir(self.img_dir):
      raise DataError(f'image folder not found: {self.img_dir} (for {self.ann_file})')

    cats = sorted(data['categories'], key=lambda c: c['id'])
    self.cat_ids = [c['id'] for c in cats]
    self.class_names = [str(c['name']) for c in cats]
    if len(set(self.cat_ids)) != len(self.cat_ids):
      raise DataError(f'{self.ann_file}: duplicate category ids in {self.cat_ids}')
    label_of = {cid: k for k, cid in enumerate(self.cat_ids)}

    images = data['images']
    index_of = {}
    for i, img in enumerate(images):
      if img['id'] in index_of:
        raise DataError(f'{self.ann_file}: image id {img["id"]} is listed twice')
      index_of[img['id']] = i

    anns = data.get('annotations', [])
    img_index = np.empty(len(anns), np.int64)
    labels = np.empty(len(anns), np.int32)
    for a, ann in enumerate(anns):
      if ann['image_id'] not in index_of:
        raise DataError(f'{self.ann_file}: annotation id {ann.get("id")} refers to image_id '
                        f'{ann["image_id"]}, which is not in "images"')
      if ann['category_id'] not in label_of:
        raise DataError(f'{self.ann_file}: annotation id {ann.get("id")} has category_id '
                        f'{ann["category_id"]}, not one of the categories {self.cat_ids}')
      img_index[a] = index_of[ann['image_id']]
      labels[a] = label_of[ann['category_id']]
    xywh = np.asarray([ann['bbox'] for ann in anns], np.float64).reshape(-1, 4)
    crowd = np.asarray([bool(ann.get('iscrowd', 0)) for ann in anns], bool)
    area_ok = np.asarray([not (isinstance(ann.get('area'), (int, float)) and ann['area'] <= 0)
                          for ann in anns], bool)
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    sizes = np.asarray([(img['height'], img['width']) for img in images], np.float64)
    keep = area_ok & (xywh[:, 2] >= 1) & (xywh[:, 3] >= 1)   # mmdetection's CocoDataset rule
    boxes, keep = _clip_and_filter(boxes, keep, sizes[img_index, 0:1], sizes[img_index, 1:2])

    # Missing files are found now, not after hours of training.
    paths = [os.path.join(self.img_dir, img['file_name']) for img in images]
    present = np.asarray([os.path.isfile(p) for p in paths], bool)
    if not present.all():
      missing = np.flatnonzero(~present)
      example = f'{paths[missing[0]]} (image id {images[missing[0]]["id"]})'
      if not self.skip_bad_images:
        raise DataError(f'{self.ann_file} lists {len(missing)} image(s) missing from '
                        f'{self.img_dir}, e.g. {example}; set data.skip_bad_images=True '
                        'to skip them')
      log.warning('skipping %d image(s) listed in %s but missing from %s, e.g. %s',
                  len(missing), self.ann_file, self.img_dir, example)
      if not present.any():
        raise DataError(f'none of the {len(images)} images of {self.ann_file} exist in '
                        f'{self.img_dir}')

    # Compact storage (pickles fast into grain workers): annotations sorted by image,
    # with offsets into the concatenated arrays.
    keep &= present[img_index]
    order = np.argsort(img_index[keep], kind='stable')
    kept_index = img_index[keep][order]
    self._boxes = boxes[keep][order].astype(np.float32)
    self._labels = labels[keep][order]
    self._crowd = crowd[keep][order]
    rows = np.flatnonzero(present)
    new_index = np.cumsum(present) - 1
    counts = np.bincount(new_index[kept_index], minlength=len(rows))
    self._offsets = np.concatenate([[0], np.cumsum(counts)])
    self._paths = [paths[i] for i in rows]
    self._sizes = sizes[rows].astype(np.int64)
    self.image_ids = [images[i]['id'] for i in rows]

  def __len__(self):
    return len(self._paths)

  def _index(self, i):
    i = operator.index(i)
    if not -len(self) <= i < len(self):
      raise IndexError(f'index {i} out of range for {len(self)} images')
    return i % len(self)

  def annotations(self, i):
    """The record of image ``i`` without ``image`` (nothing is decoded)."""
    i = self._index(i)
    a, b = self._offsets[i], self._offsets[i + 1]
    h, w = self._sizes[i]
    return dict(boxes=self._boxes[a:b].copy(), labels=self._labels[a:b].copy(),
                crowd=self._crowd[a:b].copy(), image_id=self.image_ids[i],
                orig_size=(int(h), int(w)))

  def index_info(self):
    """dict(heights, widths, num_targets): (N,) arrays for the loader, from the JSON alone.

    Sizes are the file's ``height`` / ``width``; ``num_targets`` counts the non-crowd boxes
    at least 1 px wide and high.
    """
    return _index_info(self._sizes, self._boxes, self._crowd, self._offsets)

  def __getitem__(self, i):
    record = self.annotations(i)
    path = self._paths[self._index(i)]
    try:
      image = decode_image(path, name=f'{path} (image id {record["image_id"]} of {self.ann_file})')
    except DataError as e:
      if self.skip_bad_images:
        log.warning('skipping unreadable image: %s', e)
        return None
      raise
    h, w = image.shape[:2]
    if (h, w) != record['orig_size']:
      if path not in _WARNED:
        _WARNED.add(path)
        log.warning('%s is %dx%d but %s says %dx%d; boxes are clipped to the decoded size',
                    path, w, h, self.ann_file, record['orig_size'][1], record['orig_size'][0])
      boxes, keep = _clip_and_filter(record['boxes'], np.ones(len(record['boxes']), bool), h, w)
      record.update(boxes=boxes[keep], labels=record['labels'][keep], crowd=record['crowd'][keep])
      record['orig_size'] = (h, w)
    record['image'] = image
    return record

  @property
  def coco(self):
    """The pycocotools ``COCO`` of ``ann_file`` (read on first use, not pickled)."""
    if self._coco is None:
      self._coco = _quiet_coco(_read_coco_json(self.ann_file))
    return self._coco

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_coco'] = None
    return state

  def __repr__(self):
    return (f'CocoSource({self.ann_file!r}, {self.img_dir!r}: {len(self)} images, '
            f'{len(self._boxes)} boxes, {len(self.class_names)} classes)')


def _quiet_coco(dataset):
  """A pycocotools ``COCO`` from an in-memory dict, without its progress prints."""
  import contextlib
  from pycocotools.coco import COCO
  coco = COCO()
  coco.dataset = dataset
  with contextlib.redirect_stdout(io.StringIO()):
    coco.createIndex()
  return coco


# ----------------------------------------------------------------------------- TFDS

_RANDOM_ACCESS_FORMATS = ('array_record', 'parquet')


def _tfds_builder_dir(name, data_dir):
  """The directory of the prepared TFDS dataset ``name`` (or ``name`` itself if it is one).

  Looks for the generated files only: constructing TFDS's own builder classes (``tfds.builder``)
  imports TensorFlow for many datasets, ``coco`` included.
  """
  from tensorflow_datasets.core import read_only_builder
  if os.path.isfile(os.path.join(name, 'dataset_info.json')):
    return name
  try:
    kwargs = dict(data_dir=data_dir) if data_dir else {}
    return os.fspath(read_only_builder.builder_from_files(name, **kwargs).data_dir)
  except Exception:   # DatasetNotFoundError and friends
    raise DataError(
        f'TFDS dataset data.tfds.name={name!r} has no prepared files under data.tfds.data_dir='
        f'{data_dir!r}; build it once (TFDS may need TensorFlow for that) with `tfds build '
        f'{name} --file_format=array_record' + (f' --data_dir={data_dir}`' if data_dir else '`')
        + ', or set data.tfds.name to the version directory holding dataset_info.json') from None


class TfdsSource:
  """A TFDS detection dataset in the COCO layout, read without TensorFlow.

  Expected features: ``image``, ``objects/bbox`` (normalised yxyx), ``objects/label``
  (ClassLabel) and optionally ``image/id`` (else the index is the id) and
  ``objects/is_crowd``. The data must be stored as array_record (or parquet): tfrecord has
  no random access and can only be read with TensorFlow.

  Category ids: TFDS keeps only labels; ``cat_ids`` are COCO's 80 ids when the classes are
  COCO's 80, else ``label + 1``. The ``coco`` ground truth is built from the split itself
  (one pass over it, images not decoded), so evaluation needs no annotation file.
  """

  def __init__(self, name, split, *, data_dir=None, skip_bad_images=False):
    import tensorflow_datasets as tfds
    self.name, self.split = name, split
    self.skip_bad_images = bool(skip_bad_images)
    self._dir = _tfds_builder_dir(name, data_dir)
    info = tfds.builder_from_directory(self._dir).info
    formats = {f.value for f in info.available_file_formats()} or {str(info.file_format)}
    if not formats & set(_RANDOM_ACCESS_FORMATS):
      raise DataError(
          f'TFDS dataset {name!r} at {self._dir} is stored only as {sorted(formats)}, which has '
          f'no random access and needs TensorFlow to read; rebuild it with '
          f'`tfds build {name} --file_format=array_record` (or convert it once, with '
          f'TensorFlow installed: `tfds convert_format --dataset_version_dir={self._dir} '
          f'--out_file_format=array_record`)')
    features = info.features
    missing = [k for k in ('image', 'objects') if k not in features.keys()]
    if not missing:
      missing = [f'objects/{k}' for k in ('bbox', 'label') if k not in features['objects'].keys()]
    if missing:
      raise DataError(f'TFDS dataset {name!r} lacks the COCO-layout features {missing} '
                      f'(has {sorted(features.keys())})')
    self._has_id = 'image/id' in features.keys()
    self._has_crowd = 'is_crowd' in features['objects'].keys()
    self._has_area = 'area' in features['objects'].keys()
    self.class_names = list(features['objects']['label'].names)
    if len(self.class_names) == 80 and self.class_names[0] == 'person':
      self.cat_ids = list(COCO80_IDS)
    else:
      self.cat_ids = list(range(1, len(self.class_names) + 1))
    self._ds = self._coco = self._table = None
    try:
      self._length = len(self._data())
    except Exception as e:
      raise DataError(f'TFDS dataset {name!r} has no split {split!r} (data.tfds.train_split / '
                      f'val_split; it has {sorted(info.splits.keys())}): '
                      f'{str(e).splitlines()[0][:200]}') from None
    if self._length == 0:
      raise DataError(f'TFDS dataset {name!r} split {split!r} is empty')

  def _data(self):
    """The TFDS data source, opened on first use in each process (images not decoded)."""
    if self._ds is None:
      import tensorflow_datasets as tfds
      self._ds = tfds.builder_from_directory(self._dir).as_data_source(
          self.split, decoders={'image': tfds.decode.SkipDecoding()})
    return self._ds

  def __len__(self):
    return self._length

  def _index(self, i):
    i = operator.index(i)
    if not -len(self) <= i < len(self):
      raise IndexError(f'index {i} out of range for {len(self)} images')
    return i % len(self)

  def _convert(self, i, example):
    """A TFDS example -> (record without image, encoded image bytes)."""
    encoded = example['image']
    with Image.open(io.BytesIO(encoded)) as header:   # reads the header only
      w, h = ImageOps.exif_transpose(header).size if _has_orientation(header) else header.size
    objects = example['objects']
    yxyx = np.asarray(objects['bbox'], np.float32).reshape(-1, 4)
    boxes = yxyx[:, [1, 0, 3, 2]] * np.asarray([w, h, w, h], np.float32)
    labels = np.asarray(objects['label'], np.int32).reshape(-1)
    crowd = (np.asarray(objects['is_crowd'], bool).reshape(-1) if self._has_crowd
             else np.zeros(len(labels), bool))
    boxes, keep = _clip_and_filter(boxes, np.ones(len(boxes), bool), h, w)
    image_id = int(example['image/id']) if self._has_id else i
    record = dict(boxes=boxes[keep], labels=labels[keep], crowd=crowd[keep],
                  image_id=image_id, orig_size=(int(h), int(w)))
    area = (np.asarray(objects['area'], np.float64).reshape(-1)[keep] if self._has_area else None)
    return record, encoded, area

  def annotations(self, i):
    """The record of example ``i`` without ``image`` (the image is read, not decoded)."""
    i = self._index(i)
    return self._convert(i, self._data()[i])[0]

  def __getitem__(self, i):
    i = self._index(i)
    record, encoded, _ = self._convert(i, self._data()[i])
    name = f'example {i} (image id {record["image_id"]}) of TFDS {self.name}/{self.split}'
    try:
      record['image'] = decode_image(encoded, name=name)
    except DataError as e:
      if self.skip_bad_images:
        log.warning('skipping unreadable image: %s', e)
        return None
      raise
    return record

  def _scan(self):
    """One pass over the split, images not decoded: ids, sizes and boxes of every example."""
    if self._table is None:
      ids, sizes, parts, counts = [], [], [], []
      for i in range(len(self)):
        record, _, area = self._convert(i, self._data()[i])
        ids.append(record['image_id'])
        sizes.append(record['orig_size'])
        counts.append(len(record['labels']))
        wh = record['boxes'][:, 2:] - record['boxes'][:, :2]
        box_area = wh[:, 0] * wh[:, 1]
        if area is not None:   # TFDS coco keeps COCO's (mask) area; 0 when unknown
          box_area = np.where(area > 0, area, box_area)
        parts.append((record['boxes'], record['labels'], record['crowd'], box_area))
      if len(set(ids)) != len(ids):
        raise DataError(f'TFDS dataset {self.name}/{self.split} repeats image ids')
      boxes, labels, crowd, area = (np.concatenate([p[k] for p in parts]) for k in range(4))
      self._table = dict(image_ids=ids, sizes=np.asarray(sizes, np.int64).reshape(-1, 2),
                         boxes=boxes.reshape(-1, 4), labels=labels, crowd=crowd, area=area,
                         offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
    return self._table

  @property
  def image_ids(self):
    """Original image ids, index-aligned (one pass over the split on first use)."""
    if not self._has_id:
      return list(range(len(self)))
    return self._scan()['image_ids']

  def index_info(self):
    """dict(heights, widths, num_targets): (N,) arrays for the loader; one pass on first use.

    ``num_targets`` counts the non-crowd boxes at least 1 px wide and high.
    """
    t = self._scan()
    return _index_info(t['sizes'], t['boxes'], t['crowd'], t['offsets'])

  @property
  def coco(self):
    """A pycocotools ``COCO`` built from the split itself (first use: one pass)."""
    if self._coco is None:
      t = self._scan()
      images, annotations = [], []
      for i, image_id in enumerate(t['image_ids']):
        h, w = t['sizes'][i]
        images.append(dict(id=image_id, width=int(w), height=int(h), file_name=str(i)))
        for k in range(t['offsets'][i], t['offsets'][i + 1]):
          x1, y1, x2, y2 = (float(v) for v in t['boxes'][k])
          annotations.append(dict(id=k + 1, image_id=image_id,
                                  category_id=self.cat_ids[int(t['labels'][k])],
                                  bbox=[x1, y1, x2 - x1, y2 - y1], area=float(t['area'][k]),
                                  iscrowd=int(t['crowd'][k])))
      categories = [dict(id=c, name=n) for c, n in zip(self.cat_ids, self.class_names)]
      self._coco = _quiet_coco(dict(images=images, annotations=annotations,
                                    categories=categories))
    return self._coco

  def __getstate__(self):
    state = dict(self.__dict__)
    state.update(_ds=None, _coco=None, _table=None)
    return state

  def __repr__(self):
    return (f'TfdsSource({self.name!r}, {self.split!r}: {len(self)} images, '
            f'{len(self.class_names)} classes)')


def _has_orientation(image):
  try:
    return image.getexif().get(0x0112, 1) != 1
  except Exception:   # malformed EXIF: decode_image reports the file later if it matters
    return False


# ----------------------------------------------------------------------------- config

def _get(config, key, default=None):
  value = config.get(key, default) if hasattr(config, 'get') else getattr(config, key, default)
  return default if value is None else value


def build_source(data_config, split):
  """The source of ``split`` ('train' or 'val') chosen by ``data_config.source``.

  Reads ``config.data``: ``source`` in {'coco', 'tfds', 'shapes'}, ``skip_bad_images``;
  coco: ``train.ann_file``, ``train.img_dir``, ``val.ann_file``, ``val.img_dir``;
  tfds: ``tfds.name``, ``tfds.data_dir``, ``tfds.train_split``, ``tfds.val_split``;
  shapes: ``shapes.num_train`` (2000), ``shapes.num_val`` (200), ``shapes.size`` (192),
  ``shapes.seed`` (0), ``shapes.cache_dir`` (``~/.cache/jaxdet``): the dataset is generated
  there on first use and then read as a COCO folder.
  """
  if split not in ('train', 'val'):
    raise DataError(f"split={split!r}: expected 'train' or 'val'")
  source = _get(data_config, 'source')
  skip = bool(_get(data_config, 'skip_bad_images', False))
  if source == 'coco':
    files = _get(data_config, split)
    if files is None:
      raise DataError(f'data.source=coco needs data.{split}.ann_file and data.{split}.img_dir')
    ann_file, img_dir = _get(files, 'ann_file'), _get(files, 'img_dir')
    for key, value in (('ann_file', ann_file), ('img_dir', img_dir)):
      if not value:
        raise DataError(f'data.source=coco needs data.{split}.{key} (it is {value!r})')
    return CocoSource(ann_file, img_dir, skip_bad_images=skip)
  if source == 'tfds':
    tfds_config = _get(data_config, 'tfds')
    name = _get(tfds_config, 'name') if tfds_config is not None else None
    if not name:
      raise DataError('data.source=tfds needs data.tfds.name (e.g. "coco/2017")')
    split_key = f'{split}_split'
    tfds_split = _get(tfds_config, split_key, 'train' if split == 'train' else 'validation')
    return TfdsSource(name, tfds_split, data_dir=_get(tfds_config, 'data_dir') or None,
                      skip_bad_images=skip)
  if source == 'shapes':
    from jaxdet.data import shapes
    cfg = _get(data_config, 'shapes', {})
    try:
      root = shapes.ensure_dataset(
          num_train=_get(cfg, 'num_train', 2000), num_val=_get(cfg, 'num_val', 200),
          size=_get(cfg, 'size', 192), seed=_get(cfg, 'seed', 0),
          cache_dir=_get(cfg, 'cache_dir') or None)
    except ValueError as e:
      raise DataError(f'data.shapes: {e}') from None
    return CocoSource(shapes.ann_file(root, split), shapes.img_dir(root, split),
                      skip_bad_images=skip)
  raise DataError(f"data.source={source!r}: expected one of 'coco', 'tfds', 'shapes'")


def check_num_classes(model_num_classes, source):
  """Raises ``DataError`` unless the model predicts as many classes as the source has."""
  if int(model_num_classes) != len(source.class_names):
    raise DataError(f'model.num_classes={model_num_classes} but the dataset has '
                    f'{len(source.class_names)} categories ({source!r}); set '
                    f'model.num_classes={len(source.class_names)}')
