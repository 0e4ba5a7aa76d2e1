"""The SPADE diffusion UNet of SDM as used by DiffMix, NHWC, official flag names (docs/sdm.md §2)."""

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from diffmix_jax.sdm import layers

# `config.diffusion.model.dtype` names -> compute dtypes.
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}

# Official defaults of channel_mult per image_size (guided-diffusion's create_model, docs/sdm.md §1).
DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}


def parse_channel_mult(channel_mult: str, image_size: int) -> tuple[float, ...]:
  """'' -> the official default for image_size; else a comma list of numbers ('1,2' -> (1, 2)).

  Raises:
    ValueError: naming `diffusion.model.channel_mult`, for a non-number or an empty list without a
      default for `image_size`.
  """
  if not channel_mult:
    if image_size not in DEFAULT_CHANNEL_MULT:
      raise ValueError(f'diffusion.model.channel_mult is empty and image_size={image_size} has no '
                       f'official default (known: {sorted(DEFAULT_CHANNEL_MULT)})')
    return DEFAULT_CHANNEL_MULT[image_size]
  try:
    return tuple(float(v) if '.' in v else int(v) for v in channel_mult.split(','))
  except ValueError:
    raise ValueError(f'diffusion.model.channel_mult={channel_mult!r}: expected a comma list of '
                     'numbers') from None


def parse_resolutions(text: str) -> tuple[int, ...]:
  """'32,16,8' -> (32, 16, 8) (`diffusion.model.attention_resolutions`; '' -> ())."""
  return tuple(int(v) for v in text.split(',') if v.strip())


class SDMUNet(nn.Module):
  """UNet with ResBlock encoder, SPADE SDMResBlock decoder and legacy attention (docs/sdm.md §2.1, §2.9).

  Submodule names mirror the official state-dict keys with '.' written as '_' (e.g. flax
  `output_blocks_2_0/in_norm/mlp_shared_0/kernel` ↔ torch `output_blocks.2.0.in_norm.mlp_shared.0.weight`),
  which is what `convert_torch` relies on.

  Attributes:
    image_size: side S of x_t and y.
    num_channels: base width (model_channels).
    num_res_blocks: encoder res blocks per level (decoder has one more).
    channel_mult: width multipliers per level.
    attention_resolutions: feature-map sides that get attention (e.g. (32, 16, 8)).
    num_heads: heads when num_head_channels == -1.
    num_head_channels: channels per head (> 0 overrides num_heads).
    resblock_updown: resample inside residual blocks (the only mode implemented; official True).
    use_scale_shift_norm: FiLM from the time embedding.
    learn_sigma: 6 output channels (ε̂ ‖ v) instead of 3.
    num_classes: one-hot width incl. background.
    no_instance: if False, y has one extra instance-edge channel.
    dropout: dropout rate inside res blocks.
    dtype: compute dtype of convs / matmuls (norms, time MLP and head stay float32).
    remat: rematerialise every res / attention block in the backward pass.
    spade_hidden: width of each SPADE's shared conv (official 128; smaller for CPU demos).
  """
  image_size: int = 256
  num_channels: int = 256
  num_res_blocks: int = 2
  channel_mult: Sequence[float] = (1, 1, 2, 2, 4, 4)
  attention_resolutions: Sequence[int] = (32, 16, 8)
  num_heads: int = 4
  num_head_channels: int = 64
  resblock_updown: bool = True
  use_scale_shift_norm: bool = True
  learn_sigma: bool = True
  num_classes: int = 5
  no_instance: bool = False
  dropout: float = 0.0
  dtype: Any = jnp.bfloat16
  remat: bool = False
  spade_hidden: int = layers.SPADE_HIDDEN

  @property
  def label_channels(self) -> int:
    """Channels of y: num_classes one-hot (+1 edge channel unless no_instance)."""
    return self.num_classes + (0 if self.no_instance else 1)

  def _heads(self, ch: int) -> int:
    return self.num_heads if self.num_head_channels == -1 else ch // self.num_head_channels

  def _blocks(self):
    """Classes of the three block kinds, wrapped in nn.remat when requested (docs/sdm.md §5 "remat")."""
    if self.remat:
      return nn.remat(layers.ResBlock), nn.remat(layers.SDMResBlock), nn.remat(layers.AttentionBlock)
    return layers.ResBlock, layers.SDMResBlock, layers.AttentionBlock

  @nn.compact
  def __call__(self, x_t: jax.Array, t: jax.Array, y: jax.Array, train: bool = False) -> jax.Array:
    """Predicts ε̂ and the variance interpolant (docs/sdm.md §2.1).

    Args:
      x_t: [B, S, S, 3] float32 noisy image.
      t: [B] integer timesteps on the original 0…999 grid.
      y: [B, S, S, label_channels] float32 condition (all zeros = unconditional).
      train: enables dropout (needs a 'dropout' rng when dropout > 0).

    Returns:
      [B, S, S, 6] float32 (3 when learn_sigma is False): channels 0..2 ε̂, 3..5 v.
    """
    if not self.resblock_updown:
      raise NotImplementedError('SDMUNet implements resblock_updown=True only (the official setting)')
    if x_t.shape[1:3] != (self.image_size, self.image_size) or y.shape[1:3] != x_t.shape[1:3]:
      raise ValueError(f'x_t {x_t.shape} and y {y.shape} must both be {self.image_size}² (NHWC)')
    if y.shape[-1] != self.label_channels:
      raise ValueError(f'y has {y.shape[-1]} channels, expected {self.label_channels} '
                       f'(num_classes={self.num_classes}, no_instance={self.no_instance})')
    res_cls, sdm_cls, attn_cls = self._blocks()
    dt, mc = self.dtype, self.num_channels
    emb_ch = 4 * mc
    attn_ds = {self.image_size // int(r) for r in self.attention_resolutions}
    kw = dict(emb_channels=emb_ch, use_scale_shift_norm=self.use_scale_shift_norm,
              dropout=self.dropout, deterministic=not train, dtype=dt)

    # Time embedding (docs/sdm.md §2.3), fp32.
    emb = layers.timestep_embedding(t, mc)
    emb = layers.dense(emb_ch, mc, jnp.float32, 'time_embed_0')(emb)
    emb = layers.dense(emb_ch, emb_ch, jnp.float32, 'time_embed_2')(nn.silu(emb))
    y = y.astype(dt)

    # Encoder.
    ch = int(self.channel_mult[0] * mc)
    h = layers.conv(ch, 3, x_t.shape[-1], dt, 'input_blocks_0_0')(x_t.astype(dt))
    hs, idx, ds = [h], 1, 1
    for level, mult in enumerate(self.channel_mult):
      for _ in range(self.num_res_blocks):
        ch = int(mult * mc)
        h = res_cls(ch, name=f'input_blocks_{idx}_0', **kw)(h, emb)
        if ds in attn_ds:
          h = attn_cls(self._heads(ch), dt, name=f'input_blocks_{idx}_1')(h)
        hs.append(h)
        idx += 1
      if level != len(self.channel_mult) - 1:
        h = res_cls(ch, down=True, name=f'input_blocks_{idx}_0', **kw)(h, emb)
        hs.append(h)
        idx += 1
        ds *= 2

    # Middle.
    h = sdm_cls(ch, name='middle_block_0', spade_hidden=self.spade_hidden, **kw)(h, y, emb)
    h = attn_cls(self._heads(ch), dt, name='middle_block_1')(h)
    h = sdm_cls(ch, name='middle_block_2', spade_hidden=self.spade_hidden, **kw)(h, y, emb)

    # Decoder: concat (h, skip) (docs/differences.md §1.9).
    idx = 0
    for level, mult in list(enumerate(self.channel_mult))[::-1]:
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, hs.pop().astype(h.dtype)], axis=-1)
        ch = int(mult * mc)
        h = sdm_cls(ch, name=f'output_blocks_{idx}_0', spade_hidden=self.spade_hidden,
                    **kw)(h, y, emb)
        sub = 1
        if ds in attn_ds:
          h = attn_cls(self._heads(ch), dt, name=f'output_blocks_{idx}_1')(h)
          sub = 2
        if level and i == self.num_res_blocks:
          h = sdm_cls(ch, up=True, name=f'output_blocks_{idx}_{sub}',
                      spade_hidden=self.spade_hidden, **kw)(h, y, emb)
          ds //= 2
        idx += 1

    # Head in fp32 (docs/sdm.md §2.8).
    h = nn.silu(layers.GroupNorm32(dtype=jnp.float32, name='out_0')(h.astype(jnp.float32)))
    out_ch = 6 if self.learn_sigma else 3
    return layers.conv(out_ch, 3, ch, jnp.float32, 'out_2', zero=True)(h)


def create_sdm(*, image_size: int, num_channels: int, num_res_blocks: int, channel_mult: str,
               attention_resolutions: str, num_heads: int, num_head_channels: int,
               resblock_updown: bool, use_scale_shift_norm: bool, learn_sigma: bool, num_classes: int,
               no_instance: bool, dropout: float, dtype: str, remat: bool,
               spade_hidden: int) -> SDMUNet:
  """The UNet from the fields of `config.diffusion.model` (configs/common.py, official flag names),
  e.g. `create_sdm(**config.diffusion.model)`; channel_mult and attention_resolutions are comma lists
  (channel_mult '' = the official default for image_size), dtype a name of DTYPES."""
  if dtype not in DTYPES:
    raise ValueError(f'diffusion.model.dtype={dtype!r}; expected one of {sorted(DTYPES)}')
  return SDMUNet(
      image_size=image_size, num_channels=num_channels, num_res_blocks=num_res_blocks,
      channel_mult=parse_channel_mult(channel_mult, image_size),
      attention_resolutions=parse_resolutions(attention_resolutions), num_heads=num_heads,
      num_head_channels=num_head_channels, resblock_updown=resblock_updown,
      use_scale_shift_norm=use_scale_shift_norm, learn_sigma=learn_sigma, num_classes=num_classes,
      no_instance=no_instance, dropout=dropout, dtype=DTYPES[dtype], remat=remat,
      spade_hidden=spade_hidden)


def dummy_inputs(module: SDMUNet, batch: int = 1) -> tuple:
  """Zero (x_t [B, S, S, 3], t [B], y [B, S, S, Cy]) of the module's shapes, for init."""
  s = module.image_size
  return (jnp.zeros((batch, s, s, 3)), jnp.zeros((batch,), jnp.int32),
          jnp.zeros((batch, s, s, module.label_channels)))


def init_params(module: SDMUNet, rng: jax.Array, batch_size: int = 1):
  """Jitted parameter init (eager init is slow on CPU).

  Args:
    module: the UNet.
    rng: PRNG key.
    batch_size: batch of the dummy inputs.

  Returns:
    The float32 'params' pytree.
  """
  return jax.jit(lambda r: module.init(r, *dummy_inputs(module, batch_size))['params'])(rng)


def abstract_params(module: SDMUNet):
  """Parameter shapes/dtypes via jax.eval_shape (no compute, no memory).

  Traced once per distinct module (2-3 CPU-s for the full-size UNet); each call returns its own
  containers, so a caller may change the tree it gets.
  """
  return jax.tree.map(lambda leaf: leaf, _abstract_params(module))


@functools.lru_cache(maxsize=8)
def _abstract_params(module: SDMUNet):
  return jax.eval_shape(lambda: module.init(jax.random.key(0), *dummy_inputs(module)))['params']
