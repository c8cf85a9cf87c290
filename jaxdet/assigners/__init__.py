"""Assigners: pure functions of one image (vmap for a batch); the API other JAX code imports.

Anchor / point assigners return per-prior `gt_index` (>= 0 assigned gt row, -1 background,
-2 ignored); ground truth comes padded to a fixed count G with a boolean mask.
"""
from jaxdet.assigners.assignment import BACKGROUND, IGNORED, Assignment
from jaxdet.assigners.atss import atss_assign, atss_assign_dense
from jaxdet.assigners.fcos import FCOS_REGRESS_RANGES, FCOSTargets, fcos_assign
from jaxdet.assigners.hungarian import detr_match_cost, hungarian_match
from jaxdet.assigners.max_iou import max_iou_assign
