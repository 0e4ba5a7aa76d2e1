"""HoVer-Net (docs/hovernet.md §1): pre-activation ResNet-50 encoder, TP/NP/HV decoders, NHWC, Flax linen.

Module names mirror the official PyTorch state-dict keys (docs/hovernet.md §1.6) so the converter is a fixed
renaming: a key's '.'-separated segments become the Flax path, a numeric segment joins the one before
(`units.3` -> `units_3`), and '/' inside a segment becomes '_' (`conv1/bn` -> `conv1_bn`); the stem conv
(`conv0./`) is `conv0/conv`. The three decoder branches are `decoder/{tp,np,hv}`.
"""

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from diffmix_jax.hovernet import layers

MODES = ('original', 'fast')  # (input, output) sides of each (docs/hovernet.md §0):
PATCH_SHAPES = {'original': (270, 80), 'fast': (256, 164)}
# d0, d1 centre crops per side before the u1/u2 skip sums (docs/hovernet.md §1.3), full widths.
SKIP_CROPS = {'original': (92, 36), 'fast': (46, 18)}
# Output-conv inits: 'kaiming' (official; the untrained HV map is noise of std ~1) | 'zeros' (every
# head starts at its bias: a tiny network learns the demo in ~100 steps, not ~600; BENCHMARKS.md).
HEAD_INITS = ('kaiming', 'zeros')

class Stem(nn.Module):
  """conv0: 7x7 conv (valid in original mode, same in fast mode) then BNReLU (docs/hovernet.md §1.2)."""
  features: int
  padding: str

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = layers.conv(self.features, 7, 'conv', padding=self.padding)(x)
    return nn.relu(layers.batch_norm(train, 'bn')(x))


class ResUnit(nn.Module):
  """One pre-activation bottleneck unit (without the shortcut sum), docs/hovernet.md §1.2."""
  mid: int
  out: int
  stride: int
  preact: bool  # False for unit 0: its input is already activated.

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.preact:
      x = nn.relu(layers.batch_norm(train, 'preact_bn')(x))
    x = layers.conv(self.mid, 1, 'conv1')(x)
    x = nn.relu(layers.batch_norm(train, 'conv1_bn')(x))
    x = layers.conv(self.mid, 3, 'conv2', stride=self.stride)(x)
    x = nn.relu(layers.batch_norm(train, 'conv2_bn')(x))
    return layers.conv(self.out, 1, 'conv3')(x)


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
    shortcut = layers.conv(self.out, 1, 'shortcut', stride=self.stride, padding='VALID')(x)
    h = x
    for u in range(self.units):
      r = ResUnit(self.mid, self.out, self.stride if u == 0 else 1, preact=u > 0,
                  name=f'units_{u}')(h, train)
      if freeze_units:
        r = jax.lax.stop_gradient(r)
      h = r + shortcut
      shortcut = h
    return layers.BNReLU(name='blk_bna')(h, train)


class DenseUnit(nn.Module):
  """BNReLU, 1x1 conv to `mid`, BNReLU, k x k valid grouped conv to `growth` (docs/hovernet.md §1.3)."""
  mid: int
  growth: int
  k: int
  split: bool

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = nn.relu(layers.batch_norm(train, 'preact_bna_bn')(x))
    y = layers.conv(self.mid, 1, 'conv1')(y)
    y = nn.relu(layers.batch_norm(train, 'conv1_bn')(y))
    y = layers.GroupedConv(self.growth, self.k, 4, self.split, name='conv2')(y)
    return jnp.concatenate([layers.centre_crop(x, (self.k - 1) // 2), y], axis=-1)


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
    return layers.BNReLU(name='blk_bna')(x, train)


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
    x = layers.conv(self.conva, self.k, 'conva', padding='VALID')(x)
    x = DenseBlock(self.dense_units, self.mid, self.growth, self.k, self.split, name='dense')(
        x, train)
    x = layers.centre_crop(x, max(self.official_units - self.dense_units, 0) * ((self.k - 1) // 2))
    return layers.conv(self.convf, 1, 'convf')(x)


class Head(nn.Module):
  """u0: BNReLU then a 1x1 conv with bias to the branch's output channels."""
  out_ch: int
  zero_init: bool  # Zero kernel instead of the official Kaiming fan_out (see HEAD_INITS).

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = nn.relu(layers.batch_norm(train, 'bn')(x))
    init = nn.initializers.zeros if self.zero_init else layers.conv_init
    return layers.conv(self.out_ch, 1, 'conv', bias=True, kernel_init=init)(x)


class U1(nn.Module):
  """u1: a k x k *same* conva (docs/hovernet.md §1.3)."""
  features: int
  k: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return layers.conv(self.features, self.k, 'conva')(x)


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
    x = layers.upsample2x(d[3]) + d[2]
    x = UpLevel(256 // w, self.dense_units[0], 8, mid, growth, 512 // w, k, self.split,
                name='u3')(x, train)
    x = layers.upsample2x(x) + layers.centre_crop(d[1], self.skip_crops[1])
    x = UpLevel(128 // w, self.dense_units[1], 4, mid, growth, 256 // w, k, self.split,
                name='u2')(x, train)
    x = layers.upsample2x(x) + layers.centre_crop(d[0], self.skip_crops[0])
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
    feats[3] = layers.conv(1024 // w, 1, 'conv_bot')(feats[3])
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
