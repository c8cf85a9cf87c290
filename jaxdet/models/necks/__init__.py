"""Necks: Flax Linen modules mapping backbone feature maps to a pyramid."""
from jaxdet.models.necks.fpn import FPN
