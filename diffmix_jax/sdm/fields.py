"""The SDM's string and enumerated config fields, parsed without JAX (the config checks use them too):
channel multipliers, attention resolutions, compute dtypes, noise schedules, timestep respacing.
"""

DTYPES = ('float32', 'bfloat16', 'float16')
NOISE_SCHEDULES = ('linear',)

# Official defaults of channel_mult per image_size (guided-diffusion's create_model, sdm.md §1).
DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}


def parse_channel_mult(channel_mult: str, image_size: int) -> tuple[float, ...]:
  """'' → official default for image_size; else a comma list of numbers ('1,2' → (1, 2))."""
  if not channel_mult:
    if image_size not in DEFAULT_CHANNEL_MULT:
      raise ValueError(f'diffusion.model.channel_mult is empty and image_size={image_size} has no '
                       f'official default (known: {sorted(DEFAULT_CHANNEL_MULT)})')
    return DEFAULT_CHANNEL_MULT[image_size]
  return tuple(float(v) if '.' in v else int(v) for v in channel_mult.split(','))


def space_timesteps(num_steps: int, respacing: str) -> list[int]:
  """Kept original timesteps for a respacing string (sdm.md §3.7).

  Args:
    num_steps: length of the original process (1000).
    respacing: '' (all steps), 'ddimN' (smallest integer stride giving exactly N steps), or a comma list
      of counts, one per equal section of the original grid, each taken with fractional striding.

  Returns:
    Sorted list of kept original indices τ_0 < τ_1 < ….
  """
  if not respacing:
    return list(range(num_steps))
  if respacing.startswith('ddim'):
    n = int(respacing[len('ddim'):])
    for stride in range(1, num_steps):
      if len(range(0, num_steps, stride)) == n:
        return list(range(0, num_steps, stride))
    raise ValueError(f'cannot create exactly {n} steps with an integer stride from {num_steps}')
  counts = [int(c) for c in respacing.split(',')]
  size_per, extra = divmod(num_steps, len(counts))
  kept, start = [], 0
  for i, count in enumerate(counts):
    size = size_per + (1 if i < extra else 0)
    if size < count:
      raise ValueError(f'cannot take {count} steps from a section of {size} (respacing={respacing!r})')
    stride = 1 if count <= 1 else (size - 1) / (count - 1)
    cur = 0.0
    for _ in range(count):
      kept.append(start + round(cur))
      cur += stride
    start += size
  return sorted(set(kept))
