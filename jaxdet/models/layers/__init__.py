"""Layers shared by backbones, necks and heads (Flax Linen, NHWC)."""
from jaxdet.models.layers.conv import Conv
from jaxdet.models.layers.deform_conv import ModulatedDeformConv2dPack
