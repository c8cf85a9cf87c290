"""jaxdet: object detection in JAX, faithful to mmdetection's reference configs."""
__version__ = "0.1.0"
