"""TFDS builders of the nuclei datasets: `registry` (the builders by name), `tiles` (shared features and
the raw-folder builder), `raw_folders` (reading and validating {Train,Test}/{Images,Labels} folders and
the class merges), `demo_nuclei.generate` (the demo set's tiles).

This package imports nothing from diffmix_jax (diffmix_jax imports it), and importing it loads no
TFDS: `raw_folders` and `demo_nuclei.generate` are NumPy only, for the config checks.
"""
