"""From files on disk to records: sources (COCO, TFDS, the built-in shapes dataset).

See ``jaxdet.data.sources`` for the record format every source yields.
"""
from jaxdet.data.sources import (CocoSource, DataError, TfdsSource, build_source,
                                 check_num_classes, decode_image)

__all__ = ['CocoSource', 'DataError', 'TfdsSource', 'build_source', 'check_num_classes',
           'decode_image']
