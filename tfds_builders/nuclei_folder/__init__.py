"""TFDS builder for a user's nuclei folder with a class table."""
