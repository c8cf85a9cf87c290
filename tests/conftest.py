import os
import tempfile

# Tests run on the CPU in float32.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the whole run (subprocesses included): the training
# tests compile the same train / val / predict programs in several runs.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "jaxdet-test-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# The XLA:CPU flags that jaxdet's commands run with (jaxdet/engine/xla_cpu_flags.py), for this
# process and the commands it starts: tests see the numbers users get.
from jaxdet.engine.xla_cpu_flags import set_xla_cpu_flags  # noqa: E402

set_xla_cpu_flags()


import logging  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def caplog(caplog):  # pylint: disable=redefined-outer-name
  """pytest's caplog, also fed by the 'jaxdet' logger after a training run in the same process
  has set it to propagate=False (`jaxdet.engine.logging.setup_logging`)."""
  logger = logging.getLogger('jaxdet')
  logger.addHandler(caplog.handler)
  yield caplog
  logger.removeHandler(caplog.handler)
