"""TFDS builder for PanNuke."""
