"""HoVer-Net: the network, its targets, augmentation, losses, training patches, inference,
validation and the official-checkpoint import.
"""
