"""TFDS builder for CoNSeP (Graham et al., HoVer-Net, MedIA 2019), classes merged 7 -> 4 (+ background)."""

from tfds_builders import tiles


class Consep(tiles.RawFolderBuilder):
  """CoNSeP: 27 train and 14 test tiles of 1000x1000 at 40x, colorectal adenocarcinoma."""
  DATASET = 'consep'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download CoNSeP (the HoVer-Net authors' release) and unpack it. Pass the folder that holds
  Train/ and Test/ as --manual_dir:
    <manual_dir>/Train/Images/train_1.png ... train_27.png
    <manual_dir>/Train/Labels/train_1.mat ... train_27.mat   (keys inst_map, type_map)
    <manual_dir>/Test/Images/test_1.png ... test_14.png
    <manual_dir>/Test/Labels/test_1.mat ... test_14.mat
  Overlay/ folders are ignored. Use --labels original for the official release (7 classes, merged
  here) and --labels merged for copies whose type_map already holds the 4 merged classes.
  """
