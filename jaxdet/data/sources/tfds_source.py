"""TFDS detection datasets in the COCO layout, read without TensorFlow (`TfdsSource`)."""
import logging
import os

import numpy as np

from jaxdet.data.sources.coco import COCO80_IDS, coco_from_dict
from jaxdet.data.sources.images import decode_image, encoded_size
from jaxdet.data.sources.records import DataError, check_index, clip_and_filter, index_info_arrays

log = logging.getLogger(__name__)

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
    return check_index(i, len(self))

  def _convert(self, i, example):
    """A TFDS example -> (record without image, encoded image bytes)."""
    encoded = example['image']
    w, h = encoded_size(encoded)   # reads the header only
    objects = example['objects']
    yxyx = np.asarray(objects['bbox'], np.float32).reshape(-1, 4)
    boxes = yxyx[:, [1, 0, 3, 2]] * np.asarray([w, h, w, h], np.float32)
    labels = np.asarray(objects['label'], np.int32).reshape(-1)
    crowd = (np.asarray(objects['is_crowd'], bool).reshape(-1) if self._has_crowd
             else np.zeros(len(labels), bool))
    boxes, keep = clip_and_filter(boxes, np.ones(len(boxes), bool), h, w)
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
    return index_info_arrays(t['sizes'], t['boxes'], t['crowd'], t['offsets'])

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
      self._coco = coco_from_dict(dict(images=images, annotations=annotations,
                                       categories=categories))
    return self._coco

  def __getstate__(self):
    state = dict(self.__dict__)
    state.update(_ds=None, _coco=None, _table=None)
    return state

  def __repr__(self):
    return (f'TfdsSource({self.name!r}, {self.split!r}: {len(self)} images, '
            f'{len(self.class_names)} classes)')
