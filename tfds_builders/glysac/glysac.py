"""TFDS builder for GLySAC (Doan et al., SONNET, 2022), raw classes merged to 3 (+ background)."""

from tfds_builders import tiles


class Glysac(tiles.RawFolderBuilder):
  """GLySAC: gastric adenocarcinoma tiles of 1000x1000 at 40x; images .tif or .png."""
  DATASET = 'glysac'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download GLySAC (the SONNET authors' release) and pass the folder holding Train/ and Test/:
    <manual_dir>/Train/Images/<name>.tif (or .png)   <manual_dir>/Train/Labels/<name>.mat
    <manual_dir>/Test/Images/<name>.tif (or .png)    <manual_dir>/Test/Labels/<name>.mat
  Label files hold inst_map and type_map. Use --labels original for raw ids 0..10 (merged here:
  {1,2,9,10} -> 1, {4,5,6,7} -> 2, {3,8} -> 3) and --labels merged for ids already in 0..3.
  """
