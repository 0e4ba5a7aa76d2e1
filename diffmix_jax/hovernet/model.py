"""HoVer-Net (docs/hovernet.md §1): pre-activation ResNet-50 encoder, TP/NP/HV decoders, NHWC, Flax linen.

Module names mirror the official PyTorch state-dict keys (docs/hovernet.md §1.6) so the converter is a fixed
renaming: a key's '.'-separated segments become the Flax path, a numeric segment joins the one before
(`units.3` -> `units_3`), and '/' inside a segment becomes '_' (`conv1/bn` -> `conv1_bn`); the stem conv
(`conv0./`) is `conv0/conv`. The three decoder branches are `decoder/{tp,np,hv}`.
"""

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

MODES = ('original', 'fast')  # (input, output) sides of each (docs/hovernet.md §0):
PATCH_SHAPES = {'original': (270, 80), 'fast': (256, 164)}
# d0, d1 centre crops per side before the u1/u2 skip sums (docs/hovernet.md §1.3), full widths.
SKIP_CROPS = {'original': (92, 36), 'fast': (46, 18)}
# Output-conv inits: 'kaiming' (official; the untrained HV map is noise of std ~1) | 'zeros' (every
# head starts at its bias: a tiny network learns the demo in ~100 steps, not ~600; BENCHMARKS.md).
HEAD_INITS = ('kaiming', 'zeros')

# Kaiming normal, fan_out, ReLU gain, untruncated (docs/hovernet.md §1.4); output convs: HEAD_INITS
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _out_bias_init(rng, shape, dtype=jnp.float32):
  """PyTorch's default conv bias for the 64-channel output convs: U(-1/8, 1/8) (docs/hovernet.md §1.4)."""
  return jax.random.uniform(rng, shape, dtype, -0.125, 0.125)


def _bn(train: bool, name: str) -> nn.BatchNorm:
  """BatchNorm with the PyTorch settings: running = 0.9 running + 0.1 batch, eps 1e-5 (docs/differences.md §2.2)."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def _conv(features: int, k: int, name: str, stride: int = 1, padding: str = 'SAME',
          bias: bool = False, kernel_init=_conv_init) -> nn.Module:
  if k == 1:
    return Pointwise(features, stride, bias, kernel_init, name=name)
  return nn.Conv(features, (k, k), strides=(stride, stride), padding=padding,
                 use_bias=bias, kernel_init=kernel_init,
                 bias_init=_out_bias_init, name=name)


class Pointwise(nn.Module):
  """A 1x1 conv (stride s, no padding needed) as a matrix product over the pixels: the same
  `kernel` [1, 1, C_in, C_out] and `bias` parameters, names and init as `nn.Conv`, so checkpoints
  are unchanged. XLA CPU computes the weight gradient of a 1x1 `conv_general_dilated` 8-10x
  slower than the same product written as a dot (BENCHMARKS.md, HoVer-Net step)."""
  features: int
  stride: int = 1
  use_bias: bool = False
  kernel_init: Any = _conv_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', self.kernel_init, (1, 1, x.shape[-1], self.features))
    if self.stride > 1:
      x = x[:, ::self.stride, ::self.stride]
    n, h, w, c = x.shape
    y = (x.reshape(n * h * w, c) @ kernel[0, 0]).reshape(n, h, w, self.features)
    if self.use_bias:
      y = y + self.param('bias', _out_bias_init, (self.features,))
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
    kernel = self.param('kernel', _conv_init, (self.k, self.k, c_in // g, self.features))
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
    return nn.relu(_bn(train, 'bn')(x))


class Stem(nn.Module):
  """conv0: 7x7 conv (valid in original mode, same in fast mode) then BNReLU (docs/hovernet.md §1.2)."""
  features: int
  padding: str

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = _conv(self.features, 7, 'conv', padding=self.padding)(x)
    return nn.relu(_bn(train, 'bn')(x))


class ResUnit(nn.Module):
  """One pre-activation bottleneck unit (without the shortcut sum), docs/hovernet.md §1.2."""
  mid: int
  out: int
  stride: int
  preact: bool  # False for unit 0: its input is already activated.

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.preact:
      x = nn.relu(_bn(train, 'preact_bn')(x))
    x = _conv(self.mid, 1, 'conv1')(x)
    x = nn.relu(_bn(train, 'conv1_bn')(x))
    x = _conv(self.mid, 3, 'conv2', stride=self.stride)(x)
    x = nn.relu(_bn(train, 'conv2_bn')(x))
    return _conv(self.out, 1, 'conv3')(x)


class ResGroup(nn.Module):
  """Residual group d_g: projection shortcut, n units, then `blk_bna` (docs/hovernet.md §1.2, §1.5).

  With `freeze_units`, each unit's output is a constant for autodiff (phase 1 of d0, docs/differences.md §2.1).
  """
  units: int
  mid: int
  out: int
  stride: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, freeze_units: bool = False) -> jax.Array:
    shortcut = _conv(self.out, 1, 'shortcut', stride=self.stride, padding='VALID')(x)
    h = x
    for u in range(self.units):
      r = ResUnit(self.mid, self.out, self.stride if u == 0 else 1, preact=u > 0,
                  name=f'units_{u}')(h, train)
      if freeze_units:
        r = jax.lax.stop_gradient(r)
      h = r + shortcut
      shortcut = h
    return BNReLU(name='blk_bna')(h, train)


class DenseUnit(nn.Module):
  """BNReLU, 1x1 conv to `mid`, BNReLU, k x k valid grouped conv to `growth` (docs/hovernet.md §1.3)."""
  mid: int
  growth: int
  k: int
  split: bool

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = nn.relu(_bn(train, 'preact_bna_bn')(x))
    y = _conv(self.mid, 1, 'conv1')(y)
    y = nn.relu(_bn(train, 'conv1_bn')(y))
    y = GroupedConv(self.growth, self.k, 4, self.split, name='conv2')(y)
    return jnp.concatenate([centre_crop(x, (self.k - 1) // 2), y], axis=-1)


class DenseBlock(nn.Module):
  """`units` dense units, then `blk_bna`."""
  units: int
  mid: int
  growth: int
  k: int
  split: bool

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for j in range(self.units):
      x = DenseUnit(self.mid, self.growth, self.k, self.split, name=f'units_{j}')(x, train)
    return BNReLU(name='blk_bna')(x, train)


class UpLevel(nn.Module):
  """u3/u2: k x k valid conva, dense block, 1x1 convf (docs/hovernet.md §1.3).

  A block of fewer than `official_units` units is centre-cropped by the (k - 1) / 2 pixels per side
  that each missing valid conv would have removed, so the level keeps the official geometry.
  """
  conva: int
  dense_units: int
  official_units: int
  mid: int
  growth: int
  convf: int
  k: int
  split: bool

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = _conv(self.conva, self.k, 'conva', padding='VALID')(x)
    x = DenseBlock(self.dense_units, self.mid, self.growth, self.k, self.split, name='dense')(
        x, train)
    x = centre_crop(x, max(self.official_units - self.dense_units, 0) * ((self.k - 1) // 2))
    return _conv(self.convf, 1, 'convf')(x)


class Head(nn.Module):
  """u0: BNReLU then a 1x1 conv with bias to the branch's output channels."""
  out_ch: int
  zero_init: bool  # Zero kernel instead of the official Kaiming fan_out (see HEAD_INITS).

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = nn.relu(_bn(train, 'bn')(x))
    init = nn.initializers.zeros if self.zero_init else _conv_init
    return _conv(self.out_ch, 1, 'conv', bias=True, kernel_init=init)(x)


class U1(nn.Module):
  """u1: a k x k *same* conva (docs/hovernet.md §1.3)."""
  features: int
  k: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return _conv(self.features, self.k, 'conva')(x)


class Branch(nn.Module):
  """One decoder branch (TP, NP or HV): u3, u2, u1, u0 with additive skips (docs/hovernet.md §1.3)."""
  out_ch: int
  k: int
  width: int  # Channel divisor (1 = the official network).
  skip_crops: tuple[int, int]
  split: bool  # Grouped convs as per-group convs (GroupedConv).
  zero_head: bool  # Zero-initialised output conv (Head).
  dense_units: tuple[int, int] = (8, 4)  # Dense units of u3 and u2 (official 8, 4).

  @nn.compact
  def __call__(self, d: Sequence[jax.Array], train: bool) -> jax.Array:
    w, k = self.width, self.k
    mid, growth = max(128 // w, 8), max(32 // w, 4)  # Grouped convs need multiples of 4.
    x = upsample2x(d[3]) + d[2]
    x = UpLevel(256 // w, self.dense_units[0], 8, mid, growth, 512 // w, k, self.split,
                name='u3')(x, train)
    x = upsample2x(x) + centre_crop(d[1], self.skip_crops[1])
    x = UpLevel(128 // w, self.dense_units[1], 4, mid, growth, 256 // w, k, self.split,
                name='u2')(x, train)
    x = upsample2x(x) + centre_crop(d[0], self.skip_crops[0])
    x = U1(64 // w, k, name='u1')(x)
    return Head(self.out_ch, self.zero_head, name='u0')(x, train)


class Decoder(nn.Module):
  """The TP (when nr_types), NP and HV branches, in the official order."""
  nr_types: int | None
  k: int
  width: int
  skip_crops: tuple[int, int]
  split: bool
  zero_head: bool
  dense_units: tuple[int, int]

  @nn.compact
  def __call__(self, d: Sequence[jax.Array], train: bool) -> dict[str, jax.Array]:
    outs = {}
    heads = ([('tp', self.nr_types)] if self.nr_types else []) + [('np', 2), ('hv', 2)]
    for name, ch in heads:
      outs[name] = Branch(ch, self.k, self.width, self.skip_crops, self.split, self.zero_head,
                          self.dense_units, name=name)(d, train)
    return outs


class HoVerNet(nn.Module):
  """HoVer-Net (docs/hovernet.md §1).

  Attributes:
    mode: 'original' (270 -> 80, 5x5 decoder convs, valid stem) or 'fast' (256 -> 164, 3x3, same stem).
    nr_types: type classes incl. background; None for a segmentation-only model (no `tp` output).
    encoder_units: residual units per group (official (3, 4, 6, 3)).
    decoder_units: dense units of the u3 and u2 levels of each branch (official (8, 4)); fewer
      give small networks whose compile time is a fraction of the official depth's (tests).
    width: divisor of every channel count (1 = official; 8 or 16 give tiny networks for tests);
      the dense blocks keep at least 8 bottleneck and 4 growth channels (groups = 4).
    split_grouped_convs: run the dense units' grouped convs as per-group convs (`GroupedConv`);
      same parameters and outputs, far faster backward on CPU.
    head_init: initialiser of the three output 1x1 convs, one of HEAD_INITS.
  """
  mode: str = 'original'
  nr_types: int | None = 5
  encoder_units: tuple[int, ...] = (3, 4, 6, 3)
  decoder_units: tuple[int, ...] = (8, 4)
  width: int = 1
  split_grouped_convs: bool = True
  head_init: str = 'kaiming'

  @property
  def patch_shapes(self) -> tuple[int, int]:
    """(input side, output side)."""
    return PATCH_SHAPES[self.mode]

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False,
               freeze: bool = False) -> dict[str, jax.Array]:
    """Forward pass.

    Args:
      images: [N, I, I, 3] float32 RGB in 0..255, I = 270 (original) or 256 (fast).
      train: BatchNorm uses batch statistics and updates its running statistics.
      freeze: phase-1 gradient path (docs/hovernet.md §1.5): d0 unit outputs, d1's input and the
        outputs of d1-d3 are constants for autodiff (BatchNorm stays in training mode). Only
        meaningful with train=True, as in the reference.

    Returns:
      dict of raw NHWC float32 logits: `np` [N, O, O, 2], `hv` [N, O, O, 2] (x, y; no activation) and,
      with nr_types, `tp` [N, O, O, nr_types]; O = 80 (original) or 164 (fast).
    """
    if self.mode not in MODES:
      raise ValueError(f'HoVerNet.mode={self.mode!r}: expected one of {MODES}')
    if len(self.encoder_units) != 4:
      raise ValueError(f'HoVerNet.encoder_units={self.encoder_units}: expected 4 group sizes')
    if (len(self.decoder_units) != 2 or min(self.decoder_units) < 1 or
        self.decoder_units[0] > 8 or self.decoder_units[1] > 4):
      raise ValueError(f'HoVerNet.decoder_units={self.decoder_units}: expected dense units of u3 '
                       'and u2, at least 1 and at most the official 8 and 4')
    if self.head_init not in HEAD_INITS:
      raise ValueError(f'HoVerNet.head_init={self.head_init!r}: expected one of {HEAD_INITS}')
    if self.width not in (1, 2, 4, 8, 16):
      raise ValueError(f'HoVerNet.width={self.width}: expected 1, 2, 4, 8 or 16')
    size = self.patch_shapes[0]
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
      raise ValueError(f'HoVerNet ({self.mode}) expects [N, {size}, {size}, 3] RGB images; got '
                       f'{images.shape}')
    freeze = freeze and train
    w, k = self.width, (5 if self.mode == 'original' else 3)
    x = images.astype(jnp.float32) / 255.0
    x = Stem(64 // w, 'VALID' if self.mode == 'original' else 'SAME', name='conv0')(x, train)
    feats = []
    widths = ((64, 256), (128, 512), (256, 1024), (512, 2048))
    for g, ((mid, out), n) in enumerate(zip(widths, self.encoder_units)):
      if g == 1 and freeze:
        x = jax.lax.stop_gradient(x)
      x = ResGroup(n, mid // w, out // w, 1 if g == 0 else 2, name=f'd{g}')(
          x, train, freeze_units=freeze)
      if g >= 1 and freeze:  # d1-d3 run without grad in the reference: constants for autodiff.
        x = jax.lax.stop_gradient(x)
      feats.append(x)
    feats[3] = _conv(1024 // w, 1, 'conv_bot')(feats[3])
    return Decoder(self.nr_types, k, w, SKIP_CROPS[self.mode], self.split_grouped_convs,
                   self.head_init == 'zeros', tuple(self.decoder_units), name='decoder')(
                       feats, train)


def create_hovernet(*, mode: str, nr_types: int, encoder_units: Sequence[int], decoder_units:
                    Sequence[int], width: int, split_grouped_convs: bool, head_init: str) -> HoVerNet:
  """HoVerNet from the fields of `config.hovernet.model`: `create_hovernet(**config.hovernet.model)`."""
  return HoVerNet(mode=mode, nr_types=nr_types or None, encoder_units=tuple(encoder_units),
                  decoder_units=tuple(decoder_units), width=width,
                  split_grouped_convs=split_grouped_convs, head_init=head_init)


def abstract_variables(module: HoVerNet) -> dict:
  """The variables' shapes and dtypes (jax.eval_shape: no compute, no memory).

  Traced once per distinct module; each call returns its own containers.
  """
  return jax.tree.map(lambda leaf: leaf, _abstract_variables(module))


@functools.lru_cache(maxsize=8)
def _abstract_variables(module: HoVerNet) -> dict:
  size = module.patch_shapes[0]
  return jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))


# Paths (tuples of Flax names) of the encoder modules that stay trainable in phase 1 (docs/hovernet.md §1.5).
PHASE1_TRAINABLE_ENCODER = (('conv0',), ('d0', 'shortcut'), ('d0', 'blk_bna'), ('conv_bot',))


def is_frozen_in_phase1(path: Sequence[str]) -> bool:
  """True for a parameter path (Flax names from the collection root) frozen in phase 1.

  Frozen: d0 units and all of d1, d2, d3. Trainable: conv0, d0.shortcut, d0.blk_bna, conv_bot and
  the decoders (measured, docs/hovernet.md §1.5).
  """
  path = tuple(path)
  if path[0] in ('d1', 'd2', 'd3'):
    return True
  return path[0] == 'd0' and path[1].startswith('units_')
