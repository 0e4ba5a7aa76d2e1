"""TFDS builder for GLySAC."""
