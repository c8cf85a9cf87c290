"""What the loader needs to know of every record before decoding any image (`IndexInfo`)."""
import dataclasses
import logging

import numpy as np

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class IndexInfo:
  """Per-record facts the loader needs before decoding anything.

  heights, widths: (N,) int original image size;  num_targets: (N,) int count of non-crowd
  boxes at least 1 px wide and high (mmdet's annotation filter).
  """
  heights: np.ndarray
  widths: np.ndarray
  num_targets: np.ndarray


def index_info(source):
  """`IndexInfo` of a source: its ``index_info()`` method if it has one (no decoding), else
  read every record once (decodes every image: slow for large datasets)."""
  if hasattr(source, "index_info"):
    info = source.index_info()
    if not isinstance(info, IndexInfo):
      info = IndexInfo(**{k: np.asarray(info[k]) for k in ("heights", "widths", "num_targets")})
    if not len(info.heights) == len(info.widths) == len(info.num_targets) == len(source):
      raise ValueError(f"source.index_info() describes {len(info.heights)} records but the "
                       f"source has {len(source)}")
    return info
  n = len(source)
  if n > 2000:
    log.warning("source %s has no index_info(): decoding all %d images to find their sizes",
                type(source).__name__, n)
  hs, ws, nt = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64)
  for i in range(n):
    rec = source[i]
    if rec is None:  # unreadable (data.skip_bad_images): no targets, so never trained on
      hs[i], ws[i] = 1, 1
      continue
    hs[i], ws[i] = rec.get("orig_size", np.shape(rec["image"])[:2])
    b = np.asarray(rec["boxes"], np.float32).reshape(-1, 4)
    crowd = np.asarray(rec.get("crowd", np.zeros(len(b), bool)), bool).reshape(len(b))
    nt[i] = np.sum(~crowd & (b[:, 2] - b[:, 0] >= 1) & (b[:, 3] - b[:, 1] >= 1))
  return IndexInfo(hs, ws, nt)
