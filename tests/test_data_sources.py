"""Sources: COCO folders and TFDS datasets made in the tests, the records they yield, bad input."""
import io
import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from jaxdet.data.sources import (CocoSource, DataError, TfdsSource, build_source,
                                 check_num_classes)
from jaxdet.evaluation import coco_evaluate, predictions_to_coco_results

# Non-contiguous ids, listed out of order: labels must follow the sorted ids.
CATEGORIES = [dict(id=42, name='zebra'), dict(id=3, name='cat'), dict(id=7, name='dog')]
SORTED_IDS = [3, 7, 42]


def _pixels(h, w, seed):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_coco(root, images=None, annotations=None, categories=CATEGORIES, write_images=True):
  """A COCO folder under ``root``; returns (ann_file, img_dir, {file_name: pixels})."""
  if images is None:
    images = [dict(id=11, file_name='a.png', width=20, height=16),
              dict(id=5, file_name='b.png', width=12, height=18),
              dict(id=30, file_name='c.png', width=10, height=10)]
  if annotations is None:
    annotations = [
        dict(id=1, image_id=11, category_id=42, bbox=[1, 2, 5, 6], area=30, iscrowd=0),
        dict(id=2, image_id=11, category_id=3, bbox=[0.5, 0.5, 10, 4], area=40, iscrowd=1),
        dict(id=3, image_id=5, category_id=7, bbox=[2, 3, 4, 4], area=16, iscrowd=0),
    ]
  img_dir = os.path.join(root, 'images')
  os.makedirs(img_dir, exist_ok=True)
  pixels = {}
  if write_images:
    for k, img in enumerate(images):
      pixels[img['file_name']] = _pixels(img['height'], img['width'], k)
      Image.fromarray(pixels[img['file_name']]).save(os.path.join(img_dir, img['file_name']))
  ann_file = os.path.join(root, 'ann.json')
  with open(ann_file, 'w') as f:
    json.dump(dict(images=images, annotations=annotations, categories=categories), f)
  return ann_file, img_dir, pixels


def _one_line_error(excinfo, *needles):
  message = str(excinfo.value)
  assert '\n' not in message, message
  for needle in needles:
    assert str(needle) in message, (needle, message)


# ------------------------------------------------------------------- COCO records

def test_coco_records_contiguous_labels_and_original_ids(tmp_path):
  ann_file, img_dir, pixels = make_coco(tmp_path)
  src = CocoSource(ann_file, img_dir)
  assert len(src) == 3
  assert src.cat_ids == SORTED_IDS
  assert src.class_names == ['cat', 'dog', 'zebra']
  assert src.image_ids == [11, 5, 30]   # the file's order

  r = src[0]
  np.testing.assert_array_equal(r['image'], pixels['a.png'])
  assert r['image'].dtype == np.uint8 and r['image'].shape == (16, 20, 3)
  assert r['image_id'] == 11 and r['orig_size'] == (16, 20)
  np.testing.assert_array_equal(r['boxes'], np.float32([[1, 2, 6, 8], [0.5, 0.5, 10.5, 4.5]]))
  assert r['boxes'].dtype == np.float32
  np.testing.assert_array_equal(r['labels'], [2, 0])   # zebra (42) -> 2, cat (3) -> 0
  assert r['labels'].dtype == np.int32
  np.testing.assert_array_equal(r['crowd'], [False, True])

  r = src[1]
  np.testing.assert_array_equal(r['labels'], [1])
  np.testing.assert_array_equal(r['boxes'], [[2, 3, 6, 7]])
  r = src[2]   # no annotations
  assert r['boxes'].shape == (0, 4) and r['labels'].shape == (0,) and r['crowd'].shape == (0,)

  ann = src.annotations(0)
  assert 'image' not in ann
  np.testing.assert_array_equal(ann['boxes'], src[0]['boxes'])
  assert src[-1]['image_id'] == 30
  with pytest.raises(IndexError):
    src[3]


def _index_info_from_records(src):
  """The slow way: decode every record and count non-crowd boxes >= 1 px."""
  heights, widths, targets = [], [], []
  for i in range(len(src)):
    r = src[i]
    heights.append(r['image'].shape[0])
    widths.append(r['image'].shape[1])
    wh = r['boxes'][:, 2:] - r['boxes'][:, :2]
    targets.append(int(np.sum(~r['crowd'] & (wh[:, 0] >= 1) & (wh[:, 1] >= 1))))
  return heights, widths, targets


def test_coco_index_info_matches_the_records(tmp_path):
  anns = [dict(id=1, image_id=11, category_id=42, bbox=[1, 2, 5, 6], area=30),
          dict(id=2, image_id=11, category_id=3, bbox=[0, 0, 10, 4], area=40, iscrowd=1),
          dict(id=3, image_id=30, category_id=7, bbox=[2, 3, 4, 4], area=16),
          dict(id=4, image_id=30, category_id=7, bbox=[9.5, 3, 4, 4], area=16),   # 0.5 px wide
          dict(id=5, image_id=30, category_id=3, bbox=[1, 1, 2, 2], area=4)]
  ann_file, img_dir, _ = make_coco(tmp_path, annotations=anns)
  src = CocoSource(ann_file, img_dir)
  info = src.index_info()
  heights, widths, targets = _index_info_from_records(src)
  assert info['heights'].tolist() == heights == [16, 18, 10]
  assert info['widths'].tolist() == widths == [20, 12, 10]
  assert info['num_targets'].tolist() == targets == [1, 0, 2]


def test_coco_detections_carry_original_ids_and_score_perfectly(tmp_path):
  ann_file, img_dir, _ = make_coco(tmp_path)
  src = CocoSource(ann_file, img_dir)
  # Fixed-size "model output": the non-crowd ground truth, padded to N=3 rows per image.
  b = len(src)
  boxes = np.zeros((b, 3, 4), np.float32)
  scores = np.zeros((b, 3), np.float32)
  labels = np.zeros((b, 3), np.int32)
  valid = np.zeros((b, 3), bool)
  for i in range(b):
    r = src[i]
    keep = ~r['crowd']
    n = keep.sum()
    boxes[i, :n], labels[i, :n] = r['boxes'][keep], r['labels'][keep]
    scores[i, :n], valid[i, :n] = 0.9, True
  results = predictions_to_coco_results(boxes, scores, labels, valid, src.image_ids, src.cat_ids)
  assert sorted((d['image_id'], d['category_id']) for d in results) == [(5, 7), (11, 42)]
  d = [d for d in results if d['image_id'] == 11][0]
  assert d['bbox'] == [1.0, 2.0, 5.0, 6.0]
  metrics = coco_evaluate(results, src.coco, verbose=False)
  assert metrics['mAP'] == pytest.approx(1.0)
  # Written back with labels instead of ids, they would not match the ground truth.
  bad = [dict(d, category_id=int(np.searchsorted(SORTED_IDS, d['category_id']))) for d in results]
  with pytest.raises(DataError) as e:
    coco_evaluate(bad, src.coco, verbose=False)
  _one_line_error(e, 'category_id')


def test_coco_source_pickles_without_its_coco_and_reads_the_same(tmp_path):
  ann_file, img_dir, _ = make_coco(tmp_path)
  src = CocoSource(ann_file, img_dir)
  assert sorted(src.coco.getCatIds()) == SORTED_IDS   # built before pickling...
  clone = pickle.loads(pickle.dumps(src))
  assert clone._coco is None                  # ...but not shipped to workers
  for i in range(len(src)):
    a, b = src[i], clone[i]
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_coco_source_is_a_grain_data_source(tmp_path):
  grain = pytest.importorskip('grain')
  ann_file, img_dir, pixels = make_coco(tmp_path)
  ds = grain.MapDataset.source(CocoSource(ann_file, img_dir))
  assert len(ds) == 3
  np.testing.assert_array_equal(ds[1]['image'], pixels['b.png'])


def test_boxes_outside_are_clipped_and_degenerate_ones_dropped(tmp_path):
  images = [dict(id=1, file_name='a.png', width=20, height=10)]
  anns = [
      dict(id=1, image_id=1, category_id=3, bbox=[-4, -2, 10, 8], area=80),    # clipped
      dict(id=2, image_id=1, category_id=3, bbox=[15, 5, 10, 10], area=100),   # clipped
      dict(id=3, image_id=1, category_id=7, bbox=[3, 3, 0, 5], area=0),        # zero width
      dict(id=4, image_id=1, category_id=7, bbox=[25, 3, 4, 5], area=20),      # outside
      dict(id=5, image_id=1, category_id=7, bbox=[3, 3, 0.5, 5], area=2.5),    # < 1 px wide
      dict(id=6, image_id=1, category_id=7, bbox=[3, 3, 4, 5], area=0),        # area 0
      dict(id=7, image_id=1, category_id=42, bbox=[1, 1, 2, 2], area=4),       # kept as is
  ]
  ann_file, img_dir, _ = make_coco(tmp_path, images, anns)
  r = CocoSource(ann_file, img_dir)[0]
  np.testing.assert_array_equal(r['boxes'], [[0, 0, 6, 6], [15, 5, 20, 10], [1, 1, 3, 3]])
  np.testing.assert_array_equal(r['labels'], [0, 0, 2])


def _png16_rgb(array):
  """A 48-bit RGB PNG written by hand (Pillow cannot write one). ``array (H, W, 3) uint16``."""
  import struct
  import zlib
  h, w, _ = array.shape
  raw = b''.join(b'\x00' + array[y].astype('>u2').tobytes() for y in range(h))

  def chunk(kind, data):
    return (struct.pack('>I', len(data)) + kind + data
            + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff))
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 16, 2, 0, 0, 0))
          + chunk(b'IDAT', zlib.compress(raw)) + chunk(b'IEND', b''))


@pytest.mark.parametrize('kind', ['gray', 'rgba', 'gray16', 'rgb16', 'palette', 'tiff_cmyk'])
def test_unusual_image_modes_are_converted_to_rgb(tmp_path, kind):
  rng = np.random.default_rng(0)
  ann_file, img_dir, _ = make_coco(tmp_path, [dict(id=1, file_name='x.img', width=6, height=4)], [],
                                   write_images=False)
  path = os.path.join(img_dir, 'x.img')
  if kind == 'gray':
    g = rng.integers(0, 256, (4, 6), dtype=np.uint8)
    Image.fromarray(g).save(path, format='PNG')
    expected = np.stack([g] * 3, -1)
  elif kind == 'rgba':
    a = rng.integers(0, 256, (4, 6, 4), dtype=np.uint8)
    Image.fromarray(a).save(path, format='PNG')
    expected = a[..., :3]   # alpha dropped, no compositing (as OpenCV's IMREAD_COLOR)
  elif kind == 'gray16':
    g = rng.integers(0, 65536, (4, 6), dtype=np.uint16)
    Image.fromarray(g).save(path, format='PNG')
    with Image.open(path) as check:
      assert check.mode.startswith('I')   # really a 16-bit file
    expected = np.stack([(g >> 8).astype(np.uint8)] * 3, -1)
  elif kind == 'rgb16':
    a = rng.integers(0, 65536, (4, 6, 3), dtype=np.uint16)
    with open(path, 'wb') as f:
      f.write(_png16_rgb(a))
    expected = (a >> 8).astype(np.uint8)
  elif kind == 'palette':
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    index = rng.integers(0, 256, (4, 6), dtype=np.uint8)
    image = Image.fromarray(index, 'L').convert('P')
    image.putpalette(palette.reshape(-1).tolist())
    image.putdata(index.reshape(-1).tolist())
    image.save(path, format='PNG')
    expected = palette[index]
  else:
    a = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    Image.fromarray(a).convert('CMYK').save(path, format='TIFF')   # lossless CMYK
    with Image.open(path) as check:
      expected = np.asarray(check.convert('RGB'))
  r = CocoSource(ann_file, img_dir)[0]
  assert r['image'].dtype == np.uint8 and r['image'].shape == (4, 6, 3)
  np.testing.assert_array_equal(r['image'], expected)


def test_exif_orientation_is_applied(tmp_path):
  ann_file, img_dir, _ = make_coco(tmp_path, [dict(id=1, file_name='r.jpg', width=4, height=8)], [],
                                   write_images=False)
  stored = np.zeros((4, 8, 3), np.uint8)   # stored 8 wide x 4 high, displayed rotated
  stored[:, :4] = 255
  exif = Image.Exif()
  exif[0x0112] = 6   # rotate 90 degrees clockwise to display
  Image.fromarray(stored).save(os.path.join(img_dir, 'r.jpg'), exif=exif, quality=100)
  r = CocoSource(ann_file, img_dir)[0]
  assert r['orig_size'] == (8, 4) and r['image'].shape == (8, 4, 3)
  # Clockwise: the stored left half (white) ends up on top.
  assert r['image'][:3].mean() > 200 and r['image'][5:].mean() < 50


# ------------------------------------------------------------------- bad input

def test_missing_annotation_file(tmp_path):
  with pytest.raises(DataError) as e:
    CocoSource(tmp_path / 'nope.json', tmp_path)
  _one_line_error(e, 'nope.json', 'not found')


def test_annotation_file_that_is_not_json(tmp_path):
  ann_file, img_dir, _ = make_coco(tmp_path)
  with open(ann_file, 'r+') as f:
    text = f.read()
    f.seek(0)
    f.write(text[:len(text) // 2])
    f.truncate()
  with pytest.raises(DataError) as e:
    CocoSource(ann_file, img_dir)
  _one_line_error(e, ann_file, 'JSON')


def test_annotation_file_that_is_a_directory(tmp_path):
  os.makedirs(tmp_path / 'dir.json')
  with pytest.raises(DataError) as e:
    CocoSource(tmp_path / 'dir.json', tmp_path)
  _one_line_error(e, 'dir.json')


@pytest.mark.parametrize('content, needle', [
    ([1, 2, 3], 'top level'),
    (dict(annotations=[], categories=CATEGORIES), '"images"'),
    (dict(images=[dict(id=1, file_name='a.png', width=2, height=2)], annotations=[]),
     '"categories"'),
    (dict(images=[dict(id=1, width=2, height=2)], annotations=[], categories=CATEGORIES),
     'file_name'),
    (dict(images=[dict(id=1, file_name='a.png')], annotations=[], categories=CATEGORIES), 'width'),
    (dict(images=[dict(id=1, file_name='a.png', width=2, height=2)], categories=CATEGORIES,
          annotations=[dict(id=9, image_id=1, category_id=3, bbox=[1, 2, 3])]), 'annotation id 9'),
])
def test_json_that_is_not_coco(tmp_path, content, needle):
  path = tmp_path / 'x.json'
  path.write_text(json.dumps(content))
  with pytest.raises(DataError) as e:
    CocoSource(path, tmp_path)
  _one_line_error(e, 'x.json', needle)


def test_unknown_category_id(tmp_path):
  anns = [dict(id=77, image_id=11, category_id=4, bbox=[1, 1, 2, 2], area=4)]
  ann_file, img_dir, _ = make_coco(tmp_path, annotations=anns)
  with pytest.raises(DataError) as e:
    CocoSource(ann_file, img_dir)
  _one_line_error(e, ann_file, 'category_id 4', 'annotation id 77')


def test_unknown_image_id(tmp_path):
  anns = [dict(id=78, image_id=999, category_id=3, bbox=[1, 1, 2, 2], area=4)]
  ann_file, img_dir, _ = make_coco(tmp_path, annotations=anns)
  with pytest.raises(DataError) as e:
    CocoSource(ann_file, img_dir)
  _one_line_error(e, ann_file, 'image_id 999')


def test_empty_dataset(tmp_path):
  ann_file, img_dir, _ = make_coco(tmp_path, images=[], annotations=[])
  with pytest.raises(DataError) as e:
    CocoSource(ann_file, img_dir)
  _one_line_error(e, ann_file, 'empty')


def test_listed_image_missing_on_disk(tmp_path):
  ann_file, img_dir, _ = make_coco(tmp_path)
  os.remove(os.path.join(img_dir, 'b.png'))
  with pytest.raises(DataError) as e:
    CocoSource(ann_file, img_dir)
  _one_line_error(e, 'b.png', 'image id 5', 'skip_bad_images')
  src = CocoSource(ann_file, img_dir, skip_bad_images=True)
  assert src.image_ids == [11, 30] and len(src) == 2
  assert src[1]['image_id'] == 30 and src[1]['boxes'].shape == (0, 4)
  np.testing.assert_array_equal(src[0]['labels'], [2, 0])
  for name in ('a.png', 'c.png'):
    os.remove(os.path.join(img_dir, name))
  with pytest.raises(DataError) as e:
    CocoSource(ann_file, img_dir, skip_bad_images=True)
  _one_line_error(e, 'none of the 3 images')


def test_test_set_without_annotations_key(tmp_path):
  ann_file, img_dir, _ = make_coco(tmp_path)
  data = json.loads(open(ann_file).read())
  del data['annotations']
  with open(ann_file, 'w') as f:
    json.dump(data, f)
  src = CocoSource(ann_file, img_dir)
  assert len(src) == 3 and all(src[i]['boxes'].shape == (0, 4) for i in range(3))


@pytest.mark.parametrize('damage', ['truncated', 'garbage', 'empty'])
def test_unreadable_image(tmp_path, damage, caplog):
  ann_file, img_dir, _ = make_coco(tmp_path)
  path = os.path.join(img_dir, 'b.png')
  data = open(path, 'rb').read()
  with open(path, 'wb') as f:
    f.write({'truncated': data[:len(data) * 2 // 3], 'garbage': os.urandom(300),
             'empty': b''}[damage])
  src = CocoSource(ann_file, img_dir)
  src[0]   # the others still read
  with pytest.raises(DataError) as e:
    src[1]
  _one_line_error(e, 'b.png', 'image id 5')
  skipping = CocoSource(ann_file, img_dir, skip_bad_images=True)
  assert skipping[1] is None
  assert 'b.png' in caplog.text
  assert skipping[2]['image_id'] == 30


def test_decoded_size_differs_from_json(tmp_path, caplog):
  images = [dict(id=1, file_name='a.png', width=40, height=40)]
  anns = [dict(id=1, image_id=1, category_id=3, bbox=[5, 5, 30, 30], area=900)]
  ann_file, img_dir, _ = make_coco(tmp_path, images, anns, write_images=False)
  Image.fromarray(_pixels(20, 25, 0)).save(os.path.join(img_dir, 'a.png'))
  r = CocoSource(ann_file, img_dir)[0]
  assert r['orig_size'] == (20, 25)
  np.testing.assert_array_equal(r['boxes'], [[5, 5, 25, 20]])
  assert 'a.png' in caplog.text


def test_check_num_classes(tmp_path):
  ann_file, img_dir, _ = make_coco(tmp_path)
  src = CocoSource(ann_file, img_dir)
  check_num_classes(3, src)
  with pytest.raises(DataError) as e:
    check_num_classes(80, src)
  _one_line_error(e, '80', '3')


# ------------------------------------------------------------------- build_source

def test_build_source_coco_and_bad_keys(tmp_path):
  ml_collections = pytest.importorskip('ml_collections')
  ann_file, img_dir, _ = make_coco(tmp_path)
  data = ml_collections.ConfigDict(dict(
      source='coco', skip_bad_images=False,
      train=dict(ann_file=ann_file, img_dir=img_dir), val=dict(ann_file='', img_dir=img_dir)))
  assert build_source(data, 'train').image_ids == [11, 5, 30]
  with pytest.raises(DataError) as e:
    build_source(data, 'val')
  _one_line_error(e, 'data.val.ann_file')
  data.source = 'voc'
  with pytest.raises(DataError) as e:
    build_source(data, 'train')
  _one_line_error(e, "data.source='voc'")


# ------------------------------------------------------------------- TFDS

tfds = pytest.importorskip('tensorflow_datasets')

TFDS_CLASSES = ['circle', 'square', 'star']


def _tfds_examples(split):
  """(image pixels, normalised yxyx boxes, labels, crowd, image id) per example."""
  rng = np.random.default_rng(1 if split == 'train' else 2)
  examples = []
  for i in range({'train': 3, 'validation': 2}[split]):
    h, w = 10 + 2 * i, 14 - i
    n = i % 3   # 0, 1, 2 objects
    y0, x0 = rng.uniform(0, 0.4, (2, n))
    y1, x1 = y0 + rng.uniform(0.2, 0.6, n), x0 + rng.uniform(0.2, 0.6, n)
    examples.append(dict(pixels=_pixels(h, w, 10 + i),
                         yxyx=np.stack([y0, x0, y1, x1], 1).astype(np.float32),
                         labels=rng.integers(0, 3, n), crowd=np.arange(n) == 1, id=1000 + 7 * i))
  return examples


class TinyCocoLayout(tfds.core.GeneratorBasedBuilder):
  """TFDS ``coco``'s feature layout; images handed over as PNG bytes (no TensorFlow)."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(encoding_format='png'),
        'image/filename': tfds.features.Text(),
        'image/id': np.int64,
        'objects': tfds.features.Sequence({
            'area': np.int64,
            'bbox': tfds.features.BBoxFeature(),
            'id': np.int64,
            'is_crowd': np.bool_,
            'label': tfds.features.ClassLabel(names=TFDS_CLASSES),
        }),
    }))

  def _split_generators(self, dl_manager):
    return {s: self._generate_examples(s) for s in ('train', 'validation')}

  def _generate_examples(self, split):
    for i, ex in enumerate(_tfds_examples(split)):
      buf = io.BytesIO()
      Image.fromarray(ex['pixels']).save(buf, format='PNG')
      n = len(ex['labels'])
      yield i, {
          'image': buf.getvalue(), 'image/filename': f'{i}.png', 'image/id': ex['id'],
          'objects': {'area': [0] * n, 'id': list(range(n)), 'label': ex['labels'].tolist(),
                      'is_crowd': ex['crowd'].tolist(),
                      'bbox': [tfds.features.BBox(*b) for b in ex['yxyx'].tolist()]}}


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  TinyCocoLayout(data_dir=data_dir, file_format='array_record').download_and_prepare()
  return data_dir


def test_tfds_round_trip(tfds_dir):
  src = TfdsSource('tiny_coco_layout', 'train', data_dir=tfds_dir)
  examples = _tfds_examples('train')
  assert len(src) == len(examples)
  assert src.class_names == TFDS_CLASSES and src.cat_ids == [1, 2, 3]
  assert src.image_ids == [ex['id'] for ex in examples]
  for i, ex in enumerate(examples):
    r = src[i]
    h, w = ex['pixels'].shape[:2]
    np.testing.assert_array_equal(r['image'], ex['pixels'])
    assert r['orig_size'] == (h, w) and r['image_id'] == ex['id']
    y0, x0, y1, x1 = ex['yxyx'].T.astype(np.float64)
    expected = np.stack([x0 * w, y0 * h, np.minimum(x1, 1) * w, np.minimum(y1, 1) * h], 1)
    np.testing.assert_allclose(r['boxes'], expected.reshape(-1, 4), rtol=0, atol=1e-4)
    np.testing.assert_array_equal(r['labels'], ex['labels'])
    np.testing.assert_array_equal(r['crowd'], ex['crowd'])
    assert r['labels'].dtype == np.int32 and r['boxes'].dtype == np.float32


def test_tfds_index_info_matches_the_records(tfds_dir):
  src = TfdsSource('tiny_coco_layout', 'train', data_dir=tfds_dir)
  info = src.index_info()
  heights, widths, targets = _index_info_from_records(src)
  assert info['heights'].tolist() == heights
  assert info['widths'].tolist() == widths
  assert info['num_targets'].tolist() == targets == [0, 1, 1]   # 0, 1, 2 objects; 1 crowd


def test_tfds_ground_truth_from_the_split_and_perfect_detections(tfds_dir):
  src = TfdsSource('tiny_coco_layout', 'train', data_dir=tfds_dir)
  gt = src.coco
  assert sorted(gt.getImgIds()) == sorted(src.image_ids)
  assert gt.getCatIds() == [1, 2, 3]
  results = []
  for i in range(len(src)):
    r = src.annotations(i)
    for box, label, crowd in zip(r['boxes'], r['labels'], r['crowd']):
      if not crowd:
        results.append(dict(image_id=r['image_id'], category_id=src.cat_ids[label],
                            bbox=[float(box[0]), float(box[1]), float(box[2] - box[0]),
                                  float(box[3] - box[1])], score=1.0))
  assert results
  assert coco_evaluate(results, gt, verbose=False)['mAP'] == pytest.approx(1.0)


def test_tfds_source_pickles_and_opens_lazily(tfds_dir):
  src = TfdsSource('tiny_coco_layout', 'validation', data_dir=tfds_dir)
  first = src[1]
  clone = pickle.loads(pickle.dumps(src))
  assert clone._ds is None
  np.testing.assert_array_equal(clone[1]['image'], first['image'])


def test_tfds_source_reads_in_a_fresh_process(tfds_dir, tmp_path):
  """As in a grain worker: the builder class of this test is not registered there."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  src = TfdsSource('tiny_coco_layout', 'validation', data_dir=tfds_dir)
  (tmp_path / 'src.pkl').write_bytes(pickle.dumps(src))
  code = ('import pickle, sys; s = pickle.load(open(sys.argv[1], "rb")); r = s[1]; '
          'print(r["image"].sum(), r["image_id"], r["boxes"].round(3).tolist())')
  proc = subprocess.run([sys.executable, '-c', code, str(tmp_path / 'src.pkl')],
                        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=root))
  assert proc.returncode == 0, proc.stderr[-2000:]
  r = src[1]
  assert proc.stdout.split()[0] == str(r['image'].sum())
  assert f'{r["image_id"]} {r["boxes"].round(3).tolist()}' in proc.stdout


def test_tfds_builder_directory_and_build_source(tfds_dir):
  ml_collections = pytest.importorskip('ml_collections')
  builder_dir = os.path.join(tfds_dir, 'tiny_coco_layout', '1.0.0')
  assert len(TfdsSource(builder_dir, 'validation')) == 2
  data = ml_collections.ConfigDict(dict(source='tfds', skip_bad_images=False, tfds=dict(
      name='tiny_coco_layout', data_dir=tfds_dir, train_split='train', val_split='validation')))
  assert len(build_source(data, 'val')) == 2 and len(build_source(data, 'train')) == 3


def test_tfds_errors(tfds_dir, tmp_path):
  with pytest.raises(DataError) as e:
    TfdsSource('no_such_dataset_xyz', 'train', data_dir=tfds_dir)
  _one_line_error(e, 'no_such_dataset_xyz')
  with pytest.raises(DataError) as e:
    TfdsSource('tiny_coco_layout', 'test', data_dir=tfds_dir)
  _one_line_error(e, "'test'")
  # A copy whose info says tfrecord (writing real tfrecords needs TensorFlow).
  import shutil
  builder_dir = os.path.join(tfds_dir, 'tiny_coco_layout', '1.0.0')
  copy = tmp_path / 'rec' / 'tiny_coco_layout' / '1.0.0'
  shutil.copytree(builder_dir, copy)
  info_file = copy / 'dataset_info.json'
  info = json.loads(info_file.read_text())
  info['fileFormat'] = 'tfrecord'
  info_file.write_text(json.dumps(info))
  for f in os.listdir(copy):
    if '.array_record-' in f:
      os.rename(copy / f, copy / f.replace('.array_record-', '.tfrecord-'))
  with pytest.raises(DataError) as e:
    TfdsSource(str(copy), 'train')
  _one_line_error(e, 'tfrecord', 'array_record')
