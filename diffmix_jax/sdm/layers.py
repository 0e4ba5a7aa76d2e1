"""SPADE-UNet building blocks (docs/sdm.md §2): GroupNorm, SPADE, time embedding, res and attention blocks."""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from diffmix_jax.data import labels

Dtype = Any

# Hidden width of every SPADE modulation MLP (docs/sdm.md §2.5).
SPADE_HIDDEN = 128
GN_GROUPS = 32
GN_EPS = 1e-5


def torch_kernel_init(key, shape, dtype=jnp.float32):
  """PyTorch default Conv/Linear weight init, U(±1/√fan_in) (docs/sdm.md §2.2, §5 "init")."""
  return nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')(key, shape, dtype)


def torch_bias_init(fan_in: int):
  """PyTorch default bias init U(±1/√fan_in) for a layer with `fan_in` inputs."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def conv(features: int, kernel: int, fan_in: int, dtype: Dtype, name: str, zero: bool = False):
  """3×3 (padding 1) or 1×1 convolution, stride 1, fp32 params, compute in `dtype` (docs/sdm.md §2.2)."""
  if zero:
    k_init, b_init = nn.initializers.zeros, nn.initializers.zeros
  else:
    k_init, b_init = torch_kernel_init, torch_bias_init(fan_in * kernel * kernel)
  return nn.Conv(features, (kernel, kernel), strides=1, padding=kernel // 2, dtype=dtype,
                 param_dtype=jnp.float32, kernel_init=k_init, bias_init=b_init, name=name)


def dense(features: int, fan_in: int, dtype: Dtype, name: str, zero: bool = False):
  """Linear / kernel-1 Conv1d as a Dense layer with PyTorch-style init."""
  if zero:
    k_init, b_init = nn.initializers.zeros, nn.initializers.zeros
  else:
    k_init, b_init = torch_kernel_init, torch_bias_init(fan_in)
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=k_init,
                  bias_init=b_init, name=name)


class GroupNorm32(nn.Module):
  """GroupNorm with 32 groups, eps 1e-5, centred fp32 statistics (docs/sdm.md §2.2; docs/differences.md §1.2, §1.3).

  Attributes:
    affine: learnable per-channel scale (init 1) and bias (init 0), applied in fp32.
    dtype: dtype of the returned tensor.
  """
  affine: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Normalises `x` [B, H, W, C] or [B, T, C] (any dtype); returns the same shape in `dtype`."""
    c = x.shape[-1]
    if c % GN_GROUPS:
      raise ValueError(f'GroupNorm32 needs channels divisible by {GN_GROUPS}, got {c}')
    xf = x.astype(jnp.float32)
    g = xf.reshape(x.shape[0], -1, GN_GROUPS, c // GN_GROUPS)
    mean = jnp.mean(g, axis=(1, 3), keepdims=True)
    var = jnp.mean(jnp.square(g - mean), axis=(1, 3), keepdims=True)
    out = ((g - mean) * jax.lax.rsqrt(var + GN_EPS)).reshape(x.shape)
    if self.affine:
      out = out * self.param('scale', nn.initializers.ones, (c,), jnp.float32)
      out = out + self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    return out.astype(self.dtype)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding [cos, sin], frequencies exp(-ln(P)·i/half) (docs/sdm.md §2.3; docs/differences.md §1.6).

  Args:
    t: [B] integer (or float) timesteps on the original 0…999 grid.
    dim: embedding width (even).
    max_period: P.

  Returns:
    [B, dim] float32.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def avg_pool2(x: jax.Array) -> jax.Array:
  """2×2 average pool, stride 2, on [B, H, W, C]."""
  return nn.avg_pool(x, (2, 2), strides=(2, 2))


def upsample2(x: jax.Array) -> jax.Array:
  """Nearest-neighbour ×2 up-sampling of [B, H, W, C] (each pixel repeated 2×2)."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def film(h: jax.Array, e: jax.Array) -> jax.Array:
  """h·(1+scale) + shift with scale = e[:, :C], shift = e[:, C:] (docs/sdm.md §2.4; docs/differences.md §1.7).

  Args:
    h: [B, H, W, C] float32.
    e: [B, 2C] float32 projected time embedding.

  Returns:
    [B, H, W, C] float32.
  """
  scale, shift = jnp.split(e, 2, axis=-1)
  return h * (1.0 + scale[:, None, None, :]) + shift[:, None, None, :]


class SPADEGroupNorm(nn.Module):
  """SPADE: affine-free GN32 modulated by convs of the label map (docs/sdm.md §2.5; docs/differences.md §1.1).

  Attributes:
    channels: C of the normalised tensor.
    dtype: compute dtype of the modulation convs.
  """
  channels: int
  dtype: Dtype = jnp.float32
  hidden: int = SPADE_HIDDEN  # Width of the shared conv (official 128).

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    """Args: x [B, h, w, C]; y [B, H, W, Cy] full-resolution label. Returns [B, h, w, C] float32."""
    n = GroupNorm32(affine=False, dtype=jnp.float32)(x)
    k = y.shape[1] // x.shape[1]
    y_r = labels.downsample(y, k).astype(self.dtype)  # top-left pixel of each k×k cell
    a = nn.relu(conv(self.hidden, 3, y.shape[-1], self.dtype, 'mlp_shared_0')(y_r))
    gamma = conv(self.channels, 3, self.hidden, self.dtype, 'mlp_gamma')(a)
    beta = conv(self.channels, 3, self.hidden, self.dtype, 'mlp_beta')(a)
    return n * (1.0 + gamma.astype(jnp.float32)) + beta.astype(jnp.float32)


class ResBlock(nn.Module):
  """Encoder residual block with GN32 affine + time FiLM, optional 2× down-sampling (docs/sdm.md §2.4).

  Attributes:
    out_channels: Cout.
    emb_channels: width of the time embedding (4 × num_channels).
    down: average-pool ×2 after the first norm+SiLU and on the skip path.
    use_scale_shift_norm: FiLM (True) or additive embedding (False).
    dropout: dropout rate before the last conv (official 0).
    deterministic: disables dropout.
    dtype: compute dtype of the convs.
  """
  out_channels: int
  emb_channels: int
  down: bool = False
  use_scale_shift_norm: bool = True
  dropout: float = 0.0
  deterministic: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
    """Args: x [B, H, W, Cin] (dtype); emb [B, E] float32. Returns [B, H', W', Cout] in dtype."""
    cin, cout = x.shape[-1], self.out_channels
    a = nn.silu(GroupNorm32(dtype=jnp.float32, name='in_layers_0')(x))
    if self.down:
      a, x = avg_pool2(a), avg_pool2(x)
    h = conv(cout, 3, cin, self.dtype, 'in_layers_2')(a.astype(self.dtype))
    e_width = 2 * cout if self.use_scale_shift_norm else cout
    e = dense(e_width, self.emb_channels, jnp.float32, 'emb_layers_1')(nn.silu(emb))
    if self.use_scale_shift_norm:
      h = film(GroupNorm32(dtype=jnp.float32, name='out_layers_0')(h), e)
    else:
      h = GroupNorm32(dtype=jnp.float32, name='out_layers_0')(
          h.astype(jnp.float32) + e[:, None, None, :])
    h = nn.Dropout(self.dropout, deterministic=self.deterministic)(nn.silu(h))
    h = conv(cout, 3, cout, self.dtype, 'out_layers_3', zero=True)(h.astype(self.dtype))
    if cin != cout:
      x = conv(cout, 1, cin, self.dtype, 'skip_connection')(x.astype(self.dtype))
    return (x.astype(self.dtype) + h).astype(self.dtype)


class SDMResBlock(nn.Module):
  """Decoder/middle residual block with SPADE norms + time FiLM, optional 2× up-sampling (docs/sdm.md §2.6).

  Attributes: as ResBlock, with `up` instead of `down`.
  """
  out_channels: int
  emb_channels: int
  up: bool = False
  use_scale_shift_norm: bool = True
  dropout: float = 0.0
  deterministic: bool = True
  dtype: Dtype = jnp.float32
  spade_hidden: int = SPADE_HIDDEN

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array, emb: jax.Array) -> jax.Array:
    """Args: x [B, H, W, Cin]; y [B, S, S, Cy]; emb [B, E] float32. Returns [B, H', W', Cout] in dtype."""
    cin, cout = x.shape[-1], self.out_channels
    a = nn.silu(SPADEGroupNorm(cin, self.dtype, self.spade_hidden, name='in_norm')(x, y))
    if self.up:
      a, x = upsample2(a), upsample2(x)
    h = conv(cout, 3, cin, self.dtype, 'in_layers_1')(a.astype(self.dtype))
    e_width = 2 * cout if self.use_scale_shift_norm else cout
    e = dense(e_width, self.emb_channels, jnp.float32, 'emb_layers_1')(nn.silu(emb))
    if self.use_scale_shift_norm:
      h = film(SPADEGroupNorm(cout, self.dtype, self.spade_hidden, name='out_norm')(h, y), e)  # SPADE first: docs/differences.md §1.4
    else:
      h = SPADEGroupNorm(cout, self.dtype, self.spade_hidden, name='out_norm')(
          h.astype(jnp.float32) + e[:, None, None, :].astype(h.dtype), y)
    h = nn.Dropout(self.dropout, deterministic=self.deterministic)(nn.silu(h))
    h = conv(cout, 3, cout, self.dtype, 'out_layers_2', zero=True)(h.astype(self.dtype))
    if cin != cout:
      x = conv(cout, 1, cin, self.dtype, 'skip_connection')(x.astype(self.dtype))
    return (x.astype(self.dtype) + h).astype(self.dtype)


class AttentionBlock(nn.Module):
  """Self-attention over H·W with the legacy head-interleaved qkv layout (docs/sdm.md §2.7; docs/differences.md §1.8).

  The qkv Dense kernel keeps the official row order [head0: q, k, v, head1: q, k, v, …], so the
  converter transposes without permuting. Softmax runs in fp32 inside jax.nn.dot_product_attention.

  Attributes:
    num_heads: heads nH; head width d = C / nH.
    dtype: compute dtype of the qkv / proj matmuls and of QKᵀ / AV.
  """
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x [B, H, W, C]. Returns [B, H, W, C] in dtype."""
    b, hh, ww, c = x.shape
    d = c // self.num_heads
    n = GroupNorm32(dtype=self.dtype, name='norm')(x).reshape(b, hh * ww, c)
    qkv = dense(3 * c, c, self.dtype, 'qkv')(n).reshape(b, hh * ww, self.num_heads, 3, d)
    q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]  # [B, T, nH, d] each
    a = jax.nn.dot_product_attention(q, k, v, scale=1.0 / np.sqrt(d))
    a = a.astype(self.dtype).reshape(b, hh * ww, c)  # head-major channels
    out = dense(c, c, self.dtype, 'proj_out', zero=True)(a)
    return (x.astype(self.dtype) + out.reshape(b, hh, ww, c)).astype(self.dtype)
