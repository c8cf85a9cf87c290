"""From files on disk to static-shape batches.

  sources/     files -> records (COCO, TFDS, the built-in shapes dataset via `shapes`)
  transforms/  records -> transformed samples (mmdetection 3.3 semantics), padded shapes
  loader/      samples -> training / evaluation batches on grain
  categories   class names and ids of a model's labels without the dataset

See ``jaxdet.data.sources`` for the record format every source yields.
"""
from jaxdet.data.sources import (CocoSource, DataError, TfdsSource, build_source,
                                 check_num_classes, decode_image)

__all__ = ['CocoSource', 'DataError', 'TfdsSource', 'build_source', 'check_num_classes',
           'decode_image']
