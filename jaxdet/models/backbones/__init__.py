"""Backbones: Flax Linen modules returning a tuple of NHWC feature maps."""
from jaxdet.models.backbones.resnet import ResNet, frozen_param_mask
