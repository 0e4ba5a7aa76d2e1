"""TFDS builder for CoNSeP."""
