"""DiffMix in JAX/Flax: diffusion-synthesised, class-balanced training data for nuclei segmentation."""
