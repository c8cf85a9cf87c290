"""Assigners: pure functions of one image (vmap for a batch); the API other JAX code imports."""
from jaxdet.assigners.assignment import BACKGROUND, IGNORED, Assignment
