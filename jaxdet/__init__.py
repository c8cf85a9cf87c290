"""jaxdet: object detection in JAX, faithful to mmdetection's reference configs."""
__version__ = "0.1.0"


def __getattr__(name):
  """`jaxdet.Detector`, `Detections`, `draw_detections` (`jaxdet.inference`), imported on first
  use so that `import jaxdet` stays light."""
  if name in ('Detector', 'Detections', 'draw_detections'):
    from jaxdet import inference  # pylint: disable=import-outside-toplevel
    return getattr(inference, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
