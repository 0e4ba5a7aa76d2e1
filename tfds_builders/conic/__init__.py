"""TFDS builder for CoNIC (Lizard patches)."""
