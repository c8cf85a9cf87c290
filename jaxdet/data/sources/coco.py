"""COCO-format annotation files: reading and checking them, `CocoSource`, pycocotools' COCO."""
import contextlib
import io
import json
import logging
import os

import numpy as np

from jaxdet.data.sources.images import decode_image
from jaxdet.data.sources.records import DataError, check_index, clip_and_filter, index_info_arrays

log = logging.getLogger(__name__)

# The 80 category ids of COCO 2017 in label order (TFDS ``coco`` stores labels 0..79 only).
COCO80_IDS = (list(range(1, 12)) + list(range(13, 26)) + [27, 28] + list(range(31, 45)) +
              list(range(46, 66)) + [67, 70] + list(range(72, 83)) + list(range(84, 91)))


_WARNED = set()   # paths already warned about in this process (one warning each)


def read_coco_json(ann_file):
  """The parsed JSON of ``ann_file``; ``DataError`` when it is missing, unreadable or not JSON."""
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
    data = read_coco_json(self.ann_file)
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
    boxes, keep = clip_and_filter(boxes, keep, sizes[img_index, 0:1], sizes[img_index, 1:2])

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
    return check_index(i, len(self))

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
    return index_info_arrays(self._sizes, self._boxes, self._crowd, self._offsets)

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
      boxes, keep = clip_and_filter(record['boxes'], np.ones(len(record['boxes']), bool), h, w)
      record.update(boxes=boxes[keep], labels=record['labels'][keep], crowd=record['crowd'][keep])
      record['orig_size'] = (h, w)
    record['image'] = image
    return record

  @property
  def coco(self):
    """The pycocotools ``COCO`` of ``ann_file`` (read on first use, not pickled)."""
    if self._coco is None:
      self._coco = coco_from_dict(read_coco_json(self.ann_file))
    return self._coco

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_coco'] = None
    return state

  def __repr__(self):
    return (f'CocoSource({self.ann_file!r}, {self.img_dir!r}: {len(self)} images, '
            f'{len(self._boxes)} boxes, {len(self.class_names)} classes)')


def coco_from_dict(dataset):
  """A pycocotools ``COCO`` from an in-memory dict, without its progress prints."""
  from pycocotools.coco import COCO
  coco = COCO()
  coco.dataset = dataset
  with contextlib.redirect_stdout(io.StringIO()):
    coco.createIndex()
  return coco
