"""Flax networks: the SPADE diffusion UNet (SDM) and HoVer-Net."""
