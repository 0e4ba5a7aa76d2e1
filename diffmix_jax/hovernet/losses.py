"""HoVer-Net's training loss (docs/hovernet.md §3.1): cross-entropy, Dice, HV MSE and MSGE, and their sum.

Pure JAX functions of the network outputs and the targets of `hovernet_targets`; the train step
of `hovernet_train` takes their total.
"""

import jax
import jax.numpy as jnp
import numpy as np


def xentropy(logits: jax.Array, labels_: jax.Array, n: int,
             class_weights: jax.Array | None = None) -> jax.Array:
  """CE of §3.1: softmax, clamp to [1e-7, 1 - 1e-7], mean over N*H*W; with `class_weights` [n]
  the mean is weighted by the weight of each pixel's label (sum w_y CE / sum w_y)."""
  p = jnp.clip(jax.nn.softmax(logits, axis=-1), 1e-7, 1.0 - 1e-7)
  ce = -jnp.sum(jax.nn.one_hot(labels_, n) * jnp.log(p), axis=-1)
  if class_weights is None:
    return jnp.mean(ce)
  w = jnp.asarray(class_weights, jnp.float32)[labels_]
  return jnp.sum(w * ce) / jnp.sum(w)


def dice_loss(logits: jax.Array, labels_: jax.Array, n: int) -> jax.Array:
  """Dice of §3.1 summed over all channels, background included, smoothing 1e-3."""
  p, y = jax.nn.softmax(logits, axis=-1), jax.nn.one_hot(labels_, n)
  inter = jnp.sum(p * y, axis=(0, 1, 2))
  return jnp.sum(1.0 - (2.0 * inter + 1e-3) / (jnp.sum(p, (0, 1, 2)) + jnp.sum(y, (0, 1, 2)) + 1e-3))


def _msge_kernel() -> np.ndarray:
  """[5, 5, 1, 2] HWIO: out channel 0 = K_row (applied to x), 1 = K_col (applied to y), §3.1."""
  a, b = np.meshgrid(np.arange(-2, 3), np.arange(-2, 3), indexing='ij')  # a = row, b = column.
  den = a * a + b * b + 1e-15
  return np.stack([a / den, b / den], axis=-1)[:, :, None, :].astype(np.float32)


def hv_gradient(hv: jax.Array) -> jax.Array:
  """G(hv) of §3.1 (the shipped cross-derivative form, docs/differences.md §2.10): [N, H, W, 2] -> same."""
  return jax.lax.conv_general_dilated(hv, jnp.asarray(_msge_kernel()), (1, 1), [(2, 2), (2, 2)],
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                      feature_group_count=2)


def msge_loss(pred: jax.Array, true: jax.Array, nuclei: jax.Array) -> jax.Array:
  """Sum m (G(pred) - G(true))^2 / (sum m + 1e-8), m = NP mask on both channels (§3.1)."""
  m = jnp.repeat(nuclei[..., None].astype(jnp.float32), 2, axis=-1)
  d = hv_gradient(pred) - hv_gradient(true)
  return jnp.sum(m * d * d) / (jnp.sum(m) + 1e-8)


def compute_losses(out: dict, batch: dict, nr_types: int | None, mse_weight: float,
                   tp_weights=None) -> dict:
  """All loss terms and the total (§3.1; weights 1, MSE weighted by `mse_weight`); `tp_weights`
  [nr_types] weights the TP cross-entropy by class (`hovernet_targets.tp_class_weights`)."""
  t = {'np_ce': xentropy(out['np'], batch['np'], 2), 'np_dice': dice_loss(out['np'], batch['np'], 2),
       'hv_mse': jnp.mean((out['hv'] - batch['hv']) ** 2),
       'hv_msge': msge_loss(out['hv'], batch['hv'], batch['np'])}
  if nr_types:
    t['tp_ce'] = xentropy(out['tp'], batch['tp'], nr_types, tp_weights)
    t['tp_dice'] = dice_loss(out['tp'], batch['tp'], nr_types)
  t['loss'] = sum(v * (mse_weight if k == 'hv_mse' else 1.0) for k, v in t.items())
  return t
