"""HoVer-Net's modes and their patch geometry, without JAX (the config checks use them too)."""

MODES = ('original', 'fast')
# (input, output) patch sides per mode (hovernet.md §0).
PATCH_SHAPES = {'original': (270, 80), 'fast': (256, 164)}
# Output-conv inits: 'kaiming' (official) | 'zeros' (see model.py).
HEAD_INITS = ('kaiming', 'zeros')
