"""Detection heads: one file per detector family (module, loss, predict), each registering a
`Head` in `jaxdet.models.registry.HEADS`; dense one-stage heads share `DenseHead`."""
from jaxdet.models.heads.dense_head import DenseHead, Scale
from jaxdet.models.heads.head import Head
