"""Image files -> uint8 (H, W, 3) RGB arrays (Pillow), with one-line errors."""
import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from jaxdet.data.sources.records import DataError


def to_rgb(image):
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
      return to_rgb(image)
  except FileNotFoundError:
    raise DataError(f'image file not found: {name}') from None
  except UnidentifiedImageError:
    raise DataError(f'not a readable image (corrupt or unknown format): {name}') from None
  except (OSError, SyntaxError, ValueError) as e:
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise DataError(f'cannot decode image {name}: {message}') from None


def has_orientation(image):
  """Whether a PIL image's EXIF orientation is not the identity (False for bad EXIF)."""
  try:
    return image.getexif().get(0x0112, 1) != 1
  except Exception:   # malformed EXIF: decode_image reports the file later if it matters
    return False


def encoded_size(encoded):
  """(w, h) of an encoded image after its EXIF orientation; reads the header only."""
  with Image.open(io.BytesIO(encoded)) as header:
    return ImageOps.exif_transpose(header).size if has_orientation(header) else header.size
