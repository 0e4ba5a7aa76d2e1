"""Tests of diffmix_jax.convert_torch: official key/shape mapping, bit-exact round trip, error reports, CLI."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import HANG_TIMEOUT
from conftest import xla_flags
from configs import common
from diffmix_jax import convert_torch
from diffmix_jax.core import torch_files
from diffmix_jax.sdm import torch_import as sdm_torch
from diffmix_jax.core import checkpoint
from diffmix_jax.sdm import unet as sdm_unet

torch = pytest.importorskip('torch')

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The specs' state-dict table, in ../shared beside the checkout.
TSV = (pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'specs' / 'data' /
       'sdm_consep_state_dict.tsv')
SMALL_CHANNELS = 32  # reduced width that keeps the full 766-key set (GN32 needs multiples of 32)


def _small_config():
  cfg = common.base_config().diffusion.model
  cfg.num_channels = SMALL_CHANNELS
  cfg.dtype = 'float32'
  return cfg


def _random_state_dict(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return {k: torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for k, s in shapes.items()}


@pytest.fixture(scope='module')
def small_checkpoint(tmp_path_factory):
  """A torch.save'd state dict with the official key set at num_channels=32, random values."""
  shapes = sdm_torch.sdm_expected_shapes(sdm_unet.create_sdm(**_small_config()))
  sd = _random_state_dict(shapes)
  path = tmp_path_factory.mktemp('ckpt') / 'ema_0.9999_000000.pt'
  torch.save(sd, path)
  return path, sd


def test_full_size_keys_and_shapes_equal_official_tsv():
  if not TSV.exists():
    pytest.skip(f'{TSV} not found')
  rows = [line.split('\t') for line in TSV.read_text().splitlines()[1:]]
  official = {k: tuple(json.loads(s)) for k, s in rows}
  got = sdm_torch.sdm_expected_shapes(sdm_unet.create_sdm(**common.base_config().diffusion.model))
  assert got == official
  # The reduced model used for the round trip has exactly the same key set.
  small = sdm_torch.sdm_expected_shapes(sdm_unet.create_sdm(**_small_config()))
  assert set(small) == set(official)


def test_round_trip_is_bit_exact(small_checkpoint):
  path, sd = small_checkpoint
  module, params = convert_torch.load_sdm(str(path), _small_config())
  assert module.num_channels == SMALL_CHANNELS
  abstract = sdm_unet.abstract_params(module)
  assert jax.tree.structure(abstract) == jax.tree.structure(params)
  for a, p in zip(jax.tree.leaves(abstract), jax.tree.leaves(params)):
    assert a.shape == p.shape and p.dtype == np.float32
  exported = sdm_torch.export_sdm(params)
  assert set(exported) == set(sd) and len(exported) == 766
  for k, v in sd.items():
    assert exported[k].shape == tuple(v.shape), k
    np.testing.assert_array_equal(exported[k], v.numpy(), err_msg=k)
  # Layout spot checks (docs/sdm.md §2.12): OIHW → HWIO, Linear W.T, Conv1d W[:, :, 0].T, legacy qkv rows.
  w = sd['output_blocks.2.0.in_layers.1.weight'].numpy()
  np.testing.assert_array_equal(params['output_blocks_2_0']['in_layers_1']['kernel'],
                                w.transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params['time_embed_0']['kernel'], sd['time_embed.0.weight'].numpy().T)
  np.testing.assert_array_equal(params['input_blocks_10_1']['qkv']['kernel'],
                                sd['input_blocks.10.1.qkv.weight'].numpy()[:, :, 0].T)
  np.testing.assert_array_equal(params['out_0']['scale'], sd['out.0.weight'].numpy())


def test_mismatches_are_reported_by_name(small_checkpoint, tmp_path):
  _, sd = small_checkpoint
  bad = dict(sd)
  del bad['middle_block.1.qkv.bias']
  bad['extra.layer.weight'] = torch.zeros(3)
  bad['out.2.weight'] = torch.zeros(6, 64, 3, 3)
  path = tmp_path / 'bad.pt'
  torch.save(bad, path)
  with pytest.raises(torch_files.CheckpointMismatchError) as e:
    convert_torch.load_sdm(str(path), _small_config())
  msg = str(e.value)
  assert str(path) in msg
  assert 'missing keys (1): middle_block.1.qkv.bias' in msg
  assert 'unexpected keys (1): extra.layer.weight' in msg
  assert 'out.2.weight: checkpoint [6, 64, 3, 3] vs model [6, 32, 3, 3]' in msg
  # A GLySAC checkpoint loaded with the CoNSeP config: 50 SPADE input convs mismatch.
  cfg = _small_config()
  cfg.num_classes = 4
  with pytest.raises(torch_files.CheckpointMismatchError, match=r'shape mismatches \(50\)'):
    sdm_torch.sdm_params_from_state_dict({k: v.numpy() for k, v in sd.items()},
                                             sdm_unet.create_sdm(**cfg))


def test_save_load_params_and_hovernet_placeholder(small_checkpoint, tmp_path):
  path, sd = small_checkpoint
  cfg = common.base_config()
  cfg.diffusion.model = _small_config()
  out = convert_torch.convert('sdm', cfg, str(path), str(tmp_path / 'out'))
  assert sorted(os.listdir(tmp_path / 'out')) == ['sdm_model_config.json', 'sdm_params.msgpack']
  restored = checkpoint.load_tree(out, sdm_unet.abstract_params(
      sdm_unet.create_sdm(**cfg.diffusion.model)), 'the converted SDM')
  exported = sdm_torch.export_sdm(restored)
  for k, v in sd.items():
    np.testing.assert_array_equal(exported[k], v.numpy(), err_msg=k)


def test_load_hovernet_from_official_wrapper_bit_for_bit(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  from diffmix_jax.hovernet import torch_import as convert_hovernet  # pylint: disable=g-import-not-at-top
  from diffmix_jax.hovernet import model as hovernet  # pylint: disable=g-import-not-at-top
  module = hovernet.HoVerNet(mode='fast', nr_types=5, width=16)
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(1), jnp.zeros((1, 256, 256, 3))))
  rng = np.random.default_rng(1)  # Distinct random values: a swapped or transposed leaf shows.
  variables = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)
  sd = convert_hovernet.state_dict_from_variables(jax.device_get(variables), 'fast')
  path = tmp_path / 'hovernet.tar'
  torch.save({'desc': {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}}, path)
  _, loaded = convert_torch.load_hovernet(str(path), 'fast', 5, module=module)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(jax.device_get(variables))):
    np.testing.assert_array_equal(a, b)
  del sd[next(iter(sd))]
  torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, path)
  with pytest.raises(Exception, match='missing'):
    convert_torch.load_hovernet(str(path), 'fast', 5, module=module)


def test_cli(small_checkpoint, tmp_path):
  path, _ = small_checkpoint
  config_py = ROOT / 'configs' / 'consep.py'
  if not config_py.exists():
    pytest.skip(f'{config_py} not written yet')
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags())
  proc = subprocess.run(
      [sys.executable, '-m', 'diffmix_jax.convert_torch', '--model', 'sdm', '--config',
       str(config_py), f'--config.diffusion.model.num_channels={SMALL_CHANNELS}',
       '--checkpoint', str(path), '--out', str(tmp_path / 'cli')],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'sdm_params.msgpack' in proc.stdout
  cfg = json.loads((tmp_path / 'cli' / 'sdm_model_config.json').read_text())
  assert cfg['num_channels'] == SMALL_CHANNELS


# ---- forward equivalence against a functional PyTorch reading of docs/sdm.md §2 (NCHW) ----

TINY = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult='1,2',
            attention_resolutions='16', num_head_channels=32, num_classes=5, dtype='float32',
            remat=False)


def _torch_forward(sd, x, t, y, mult, nrb, head_ch):
  """Official forward (docs/sdm.md §2.1–2.8) written with torch.nn.functional on the state dict."""
  f = torch.nn.functional

  def conv(h, p):
    w = sd[p + '.weight']
    return f.conv2d(h, w, sd[p + '.bias'], padding=w.shape[-1] // 2)

  def gn(h, p=None):
    return f.group_norm(h, 32, None if p is None else sd[p + '.weight'],
                        None if p is None else sd[p + '.bias'], eps=1e-5)

  def spade(h, p):
    a = f.relu(conv(f.interpolate(y, size=h.shape[2:], mode='nearest'), p + '.mlp_shared.0'))
    return gn(h) * (1 + conv(a, p + '.mlp_gamma')) + conv(a, p + '.mlp_beta')

  def film(h, p):
    scale, shift = f.linear(f.silu(emb), sd[p + '.weight'], sd[p + '.bias']).chunk(2, dim=1)
    return h * (1 + scale[..., None, None]) + shift[..., None, None]

  def skip(h, p):
    return conv(h, p + '.skip_connection') if p + '.skip_connection.weight' in sd else h

  def resblock(h, p, down):
    a = f.silu(gn(h, p + '.in_layers.0'))
    if down:
      a, h = f.avg_pool2d(a, 2), f.avg_pool2d(h, 2)
    a = film(gn(conv(a, p + '.in_layers.2'), p + '.out_layers.0'), p + '.emb_layers.1')
    return skip(h, p) + conv(f.silu(a), p + '.out_layers.3')

  def sdmblock(h, p, up):
    a = f.silu(spade(h, p + '.in_norm'))
    if up:
      a, h = f.interpolate(a, scale_factor=2, mode='nearest'), f.interpolate(h, scale_factor=2)
    a = film(spade(conv(a, p + '.in_layers.1'), p + '.out_norm'), p + '.emb_layers.1')
    return skip(h, p) + conv(f.silu(a), p + '.out_layers.2')

  def attn(h, p):
    b, c, hh, ww = h.shape
    heads, d = c // head_ch, head_ch
    xf = h.reshape(b, c, -1)
    qkv = f.conv1d(gn(xf, p + '.norm'), sd[p + '.qkv.weight'], sd[p + '.qkv.bias'])
    q, k, v = qkv.reshape(b * heads, 3 * d, -1).split(d, dim=1)
    s = d ** -0.25
    w = torch.einsum('bct,bcs->bts', q * s, k * s).softmax(dim=-1)
    a = torch.einsum('bts,bcs->bct', w, v).reshape(b, c, -1)
    return (xf + f.conv1d(a, sd[p + '.proj_out.weight'], sd[p + '.proj_out.bias'])).reshape(h.shape)

  def run_block(h, p):
    for j in range(3):
      q = f'{p}.{j}'
      if q + '.norm.weight' in sd:
        h = attn(h, q)
      elif q + '.in_norm.mlp_shared.0.weight' in sd:
        h = sdmblock(h, q, up=j > 0 and p.startswith('output'))
    return h

  half = sd['time_embed.0.weight'].shape[1] // 2
  freqs = torch.exp(-np.log(10000) * torch.arange(half, dtype=torch.float32) / half)
  arg = t[:, None].float() * freqs[None]
  emb = torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)
  emb = f.linear(f.silu(f.linear(emb, sd['time_embed.0.weight'], sd['time_embed.0.bias'])),
                 sd['time_embed.2.weight'], sd['time_embed.2.bias'])
  h = conv(x, 'input_blocks.0.0')
  hs = [h]
  n_in = len(mult) * (nrb + 1)
  for i in range(1, n_in):
    _, pos = divmod(i - 1, nrb + 1)
    h = resblock(h, f'input_blocks.{i}.0', down=pos == nrb)
    if f'input_blocks.{i}.1.norm.weight' in sd:
      h = attn(h, f'input_blocks.{i}.1')
    hs.append(h)
  h = sdmblock(h, 'middle_block.0', False)
  h = sdmblock(attn(h, 'middle_block.1'), 'middle_block.2', False)
  for i in range(len(mult) * (nrb + 1)):
    h = run_block(torch.cat([h, hs.pop()], dim=1), f'output_blocks.{i}')
  return conv(f.silu(gn(h, 'out.0')), 'out.2')


def test_forward_matches_torch_reference_tiny():
  """Converted params + Flax forward == a torch.nn.functional forward on the same state dict."""
  cfg = _small_config()
  cfg.update(**TINY)
  module = sdm_unet.create_sdm(**cfg)
  shapes = sdm_torch.sdm_expected_shapes(module)
  rng = np.random.default_rng(5)
  sd = {k: torch.from_numpy((0.1 * rng.standard_normal(s)).astype(np.float32))
        for k, s in shapes.items()}
  params = sdm_torch.sdm_params_from_state_dict({k: v.numpy() for k, v in sd.items()}, module)
  x = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
  labels = rng.integers(0, 5, (2, 32, 32))
  y = np.concatenate([np.eye(5)[labels], rng.integers(0, 2, (2, 32, 32, 1))], -1).astype(np.float32)
  t = np.array([17, 812], np.int32)
  got = jax.jit(lambda p, x, t, y: module.apply({'params': p}, x, t, y))(params, x, t, y)
  with torch.no_grad():
    want = _torch_forward(sd, torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                          torch.from_numpy(y).permute(0, 3, 1, 2), (1, 2), 1, 32)
  want = want.permute(0, 2, 3, 1).numpy()
  assert got.shape == want.shape == (2, 32, 32, 6)
  err = np.abs(np.asarray(got) - want).max() / np.abs(want).max()
  assert err < 1e-4, err
