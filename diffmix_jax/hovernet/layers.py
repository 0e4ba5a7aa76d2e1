"""HoVer-Net's building blocks (docs/hovernet.md §1): the official inits, PyTorch-style BatchNorm,
convs (1x1 as dot products, grouped convs split per group on CPU), crops and upsampling, NHWC."""

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

# Kaiming normal, fan_out, ReLU gain, untruncated (docs/hovernet.md §1.4); output convs: model.HEAD_INITS
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def out_bias_init(rng, shape, dtype=jnp.float32):
  """PyTorch's default conv bias for the 64-channel output convs: U(-1/8, 1/8) (docs/hovernet.md §1.4)."""
  return jax.random.uniform(rng, shape, dtype, -0.125, 0.125)


def batch_norm(train: bool, name: str) -> nn.BatchNorm:
  """BatchNorm with the PyTorch settings: running = 0.9 running + 0.1 batch, eps 1e-5 (docs/differences.md §2.2)."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def conv(features: int, k: int, name: str, stride: int = 1, padding: str = 'SAME',
          bias: bool = False, kernel_init=conv_init) -> nn.Module:
  if k == 1:
    return Pointwise(features, stride, bias, kernel_init, name=name)
  return nn.Conv(features, (k, k), strides=(stride, stride), padding=padding,
                 use_bias=bias, kernel_init=kernel_init,
                 bias_init=out_bias_init, name=name)


class Pointwise(nn.Module):
  """A 1x1 conv (stride s, no padding needed) as a matrix product over the pixels: the same
  `kernel` [1, 1, C_in, C_out] and `bias` parameters, names and init as `nn.Conv`, so checkpoints
  are unchanged. XLA CPU computes the weight gradient of a 1x1 `conv_general_dilated` 8-10x
  slower than the same product written as a dot (BENCHMARKS.md, HoVer-Net step)."""
  features: int
  stride: int = 1
  use_bias: bool = False
  kernel_init: Any = conv_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', self.kernel_init, (1, 1, x.shape[-1], self.features))
    if self.stride > 1:
      x = x[:, ::self.stride, ::self.stride]
    n, h, w, c = x.shape
    y = (x.reshape(n * h * w, c) @ kernel[0, 0]).reshape(n, h, w, self.features)
    if self.use_bias:
      y = y + self.param('bias', out_bias_init, (self.features,))
    return y


class GroupedConv(nn.Module):
  """A bias-free k x k VALID grouped conv whose groups run as separate convs (same kernel tree).

  The kernel is [k, k, C_in / groups, C_out], as `nn.Conv(feature_group_count=groups)` and the
  official grouped conv hold it, so checkpoints and initial values are unchanged. XLA's CPU backward
  of a grouped conv is 10-30x slower than that of the equivalent per-group convs (BENCHMARKS.md);
  `split=False` keeps the single grouped op, which accelerators run natively.
  """
  features: int
  k: int
  groups: int
  split: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c_in, g = x.shape[-1], self.groups
    if c_in % g or self.features % g:
      raise ValueError(f'GroupedConv: {c_in} input / {self.features} output channels are not '
                       f'multiples of {g} groups')
    kernel = self.param('kernel', conv_init, (self.k, self.k, c_in // g, self.features))
    conv = lambda a, w, groups: jax.lax.conv_general_dilated(
        a, w.astype(a.dtype), (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=groups)
    if not self.split:
      return conv(x, kernel, g)
    ci, co = c_in // g, self.features // g
    return jnp.concatenate([conv(x[..., i * ci:(i + 1) * ci], kernel[..., i * co:(i + 1) * co], 1)
                            for i in range(g)], axis=-1)


def centre_crop(x: jax.Array, per_side: int) -> jax.Array:
  """Crops `per_side` pixels from each side of H and W of NHWC `x`."""
  if per_side == 0:
    return x
  return x[:, per_side:-per_side, per_side:-per_side, :]


def upsample2x(x: jax.Array) -> jax.Array:
  """Nearest-neighbour x2 (UpSample2x, docs/hovernet.md §1.1): [N, H, W, C] -> [N, 2H, 2W, C]."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class BNReLU(nn.Module):
  """`blk_bna` / `conv0`-style BatchNorm then ReLU, the BN named `bn`."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    return nn.relu(batch_norm(train, 'bn')(x))
