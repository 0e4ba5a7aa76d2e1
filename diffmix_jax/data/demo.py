"""The built-in demo set on files: the README picture and the tiles in CoNSeP layout (docs/datasets.md §4).

The tiles themselves come from `tfds_builders.demo_nuclei.generate` (a pure function of seed, split and
index); the `demo_nuclei` TFDS builder serves the same tiles to the chain.
"""

import numpy as np

from tfds_builders.demo_nuclei import generate as demo_tiles


def preview(tiles: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> np.ndarray:
  """Two rows: the images, then their labels with classes in colour and instance edges in white.

  Args:
    tiles: (image uint8 [S, S, 3], inst_map, type_map) triples.

  Returns:
    uint8 [2S, n S, 3].
  """
  from diffmix_jax.data import labels  # pylint: disable=g-import-not-at-top
  images = np.concatenate([t[0] for t in tiles], axis=1)
  maps = []
  for _, inst, types in tiles:
    colour = labels.class_colours(types)
    colour[labels.edge_map(inst) & (inst > 0)] = 255
    maps.append(colour)
  return np.concatenate([images, np.concatenate(maps, axis=1)], axis=0)


def export(folder: str, splits: tuple[str, ...] = ('test',)) -> list[str]:
  """Writes demo tiles in the CoNSeP layout, for `predict` and `evaluate` on files.

  `folder/Images/<split>_<k>.png` (RGB) and `folder/Labels/<split>_<k>.mat` with `inst_map`,
  `type_map` int32 [256, 256], `inst_type` int32 [N, 1] (majority class per nucleus) and
  `inst_centroid` float64 [N, 2] (x, y), k = 1..NUM_TILES[split], the names of the built dataset;
  every file written atomically.

  Returns:
    The tile names written.
  """
  import pathlib  # pylint: disable=g-import-not-at-top
  from diffmix_jax.metrics import records  # pylint: disable=g-import-not-at-top
  root, names = pathlib.Path(folder), []
  for split in splits:
    if split not in demo_tiles.NUM_TILES:
      raise ValueError(f'demo split {split!r}: expected one of {", ".join(demo_tiles.NUM_TILES)}')
    for i in range(demo_tiles.NUM_TILES[split]):
      image, inst, types = demo_tiles.make_tile(demo_tiles.SEED, split, i)
      name = f'{split}_{i + 1}'
      rec = records.label_record(inst, types)
      records.write_consep_example(root, name, image, {
          'inst_map': rec['inst_map'], 'type_map': types.astype(np.int32),
          'inst_type': rec['inst_type'][:, None], 'inst_centroid': rec['inst_centroid']})
      names.append(name)
  return names


def main(argv: list[str] | None = None) -> None:
  """`python -m diffmix_jax.data.demo [PNG]` draws the README picture; `--export DIR [--split S]`
  writes demo tiles as Images/*.png + Labels/*.mat."""
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog='python -m diffmix_jax.data.demo', description=main.__doc__)
  parser.add_argument('preview', nargs='?', default='demo_tiles.png', help='picture to write')
  parser.add_argument('--export', metavar='DIR', help='write tiles in the CoNSeP layout instead')
  parser.add_argument('--split', default='test', choices=(*demo_tiles.NUM_TILES, 'all'),
                      help='tiles to export (default test: the rare-enriched split)')
  args = parser.parse_args(argv)
  if args.export:
    names = export(args.export, tuple(demo_tiles.NUM_TILES) if args.split == 'all' else (args.split,))
    print(f'wrote {len(names)} tiles to {args.export}/Images and {args.export}/Labels')
    return
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.fromarray(preview([demo_tiles.make_tile(demo_tiles.SEED, 'train', i) for i in (0, 2, 3, 5)])).save(args.preview)
  print(f'wrote {args.preview}')


if __name__ == '__main__':
  main()
