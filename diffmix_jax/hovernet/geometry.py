"""HoVer-Net's modes and their patch geometry, without JAX (the config checks use them too)."""

MODES = ('original', 'fast')
# (input, output) patch sides per mode (hovernet.md §0).
PATCH_SHAPES = {'original': (270, 80), 'fast': (256, 164)}
# Centre crops per side of d0 and d1 before the u1/u2 skip sums (hovernet.md §1.3), full-size widths.
SKIP_CROPS = {'original': (92, 36), 'fast': (46, 18)}
# Output-conv inits. 'kaiming' is the official one; with 2 output channels its fan_out gives kernel
# std 1, so the untrained HV map is noise of std ~sqrt(C/2) that Adam must first shrink weight by
# weight. 'zeros' starts every head at its bias: on the demo tiles a tiny network then separates
# nuclei after ~100 steps instead of ~600 (tests/stages/hovernet_train_test.py, BENCHMARKS.md).
HEAD_INITS = ('kaiming', 'zeros')
