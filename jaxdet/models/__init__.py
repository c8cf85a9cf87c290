"""Flax Linen modules: backbones, necks, heads, shared layers and the detectors built from them."""
