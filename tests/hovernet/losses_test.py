"""Tests of the HoVer-Net losses against NumPy (docs/hovernet.md §3.1): CE, Dice, the MSGE kernel."""

import jax.numpy as jnp
import numpy as np

from diffmix_jax.hovernet import losses as hovernet_losses


def _np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_ce_and_dice_match_numpy():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
  labels = rng.integers(0, 3, (2, 4, 4))
  p = np.clip(_np_softmax(logits.astype(np.float64)), 1e-7, 1 - 1e-7)
  y = np.eye(3)[labels]
  ce = -np.mean(np.sum(y * np.log(p), -1))
  p = _np_softmax(logits.astype(np.float64))
  dice = np.sum(1 - (2 * (p * y).sum((0, 1, 2)) + 1e-3) / (p.sum((0, 1, 2)) + y.sum((0, 1, 2)) + 1e-3))
  np.testing.assert_allclose(hovernet_losses.xentropy(logits, labels, 3), ce, rtol=1e-5)
  np.testing.assert_allclose(hovernet_losses.dice_loss(logits, labels, 3), dice, rtol=1e-5)
  # Class-weighted CE: sum w_y CE / sum w_y; equal weights give the official mean.
  p = np.clip(_np_softmax(logits.astype(np.float64)), 1e-7, 1 - 1e-7)
  w = np.array([0.5, 3.0, 1.0])[labels]
  weighted = np.sum(w * -np.sum(y * np.log(p), -1)) / np.sum(w)
  np.testing.assert_allclose(hovernet_losses.xentropy(logits, labels, 3, np.array([0.5, 3.0, 1.0])),
                             weighted, rtol=1e-5)
  np.testing.assert_allclose(hovernet_losses.xentropy(logits, labels, 3, np.full(3, 7.0)), ce,
                             rtol=1e-5)


def test_msge_kernel_orientation_and_cross_derivatives():
  k = hovernet_losses._msge_kernel()  # pylint: disable=protected-access
  np.testing.assert_allclose(k[:, :, 0, 0], [[-.25, -.4, -.5, -.4, -.25], [-.2, -.5, -1, -.5, -.2],
                                             [0, 0, 0, 0, 0], [.2, .5, 1, .5, .2],
                                             [.25, .4, .5, .4, .25]], rtol=1e-6)
  np.testing.assert_allclose(k[:, :, 0, 1], k[:, :, 0, 0].T, rtol=1e-6)
  # A map varying only along x (columns) in channel 0 has zero gradient away from the border:
  # the shipped loss differentiates channel 0 along rows (docs/differences.md §2.10).
  xs = np.tile(np.linspace(-1, 1, 12, dtype=np.float32), (12, 1))
  hv = np.stack([xs, xs.T], -1)[None]
  g = np.asarray(hovernet_losses.hv_gradient(jnp.asarray(hv)))
  np.testing.assert_allclose(g[0, 2:-2, 2:-2], 0, atol=1e-6)
  mask = np.ones((1, 12, 12), np.int32)
  assert float(hovernet_losses.msge_loss(jnp.asarray(hv), jnp.asarray(hv), mask)) == 0.0
  moved = hv + np.random.default_rng(0).standard_normal(hv.shape).astype(np.float32)
  d = np.asarray(hovernet_losses.hv_gradient(jnp.asarray(moved))) - g
  np.testing.assert_allclose(hovernet_losses.msge_loss(jnp.asarray(moved), jnp.asarray(hv), mask),
                             (d ** 2).sum() / (2 * 144 + 1e-8), rtol=1e-5)
