"""``Conv``: ``flax.linen.Conv`` on ``jaxdet.ops.conv_general_dilated``.

``Conv(...)`` builds an ``nn.Conv`` (same attributes, parameters and names) whose convolution is
``jaxdet.ops.conv_general_dilated``: lax's forward value and input gradient, and on the CPU a
kernel gradient of matrix products for 1 x 1 kernels and for k x k kernels on >= 256 input
channels (jaxdet/ops/conv.py; RetinaNet's 512 x 512 training step 6.1 -> 5.4 s on the 2-core
CPU). Every convolution of jaxdet's backbones, necks and heads is one.
"""
import functools

import flax.linen as nn

from jaxdet.ops.conv import conv_general_dilated

Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
