import os

# Tests run on the CPU with float32; keep XLA from grabbing every core twice over.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
