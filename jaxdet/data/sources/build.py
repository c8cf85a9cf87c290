"""`build_source`: the source a config names; `check_num_classes`."""
from jaxdet.data.sources.coco import CocoSource
from jaxdet.data.sources.records import DataError
from jaxdet.data.sources.tfds_source import TfdsSource


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
