"""Chaining transforms: `Compose` and mmcv's `RandomChoice`."""


class Compose:
  """Apply transforms in order; a transform returning None ends the chain with None."""

  def __init__(self, transforms):
    self.transforms = list(transforms)

  def __call__(self, sample, rng):
    for t in self.transforms:
      sample = t(sample, rng)
      if sample is None:
        return None
    return sample


class RandomChoice:
  """mmcv ``RandomChoice``: apply one of several transform chains, chosen uniformly."""

  def __init__(self, branches):
    self.branches = [Compose(b) for b in branches]

  def __call__(self, sample, rng):
    return self.branches[rng.choice(len(self.branches))](sample, rng)
