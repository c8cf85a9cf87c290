"""Detection heads: Flax Linen modules, one file per head, all built on `DenseHead`."""
from jaxdet.models.heads.dense_head import DenseDetectorHead, DenseHead, Scale, mean_over_devices
