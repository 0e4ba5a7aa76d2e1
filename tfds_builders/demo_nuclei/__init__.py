"""TFDS builder for the built-in demo set."""
