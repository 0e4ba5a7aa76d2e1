"""The semantic diffusion model: SPADE layers, the UNet, the diffusion math and the samplers.
"""
