"""Shared machinery of the stages: device mesh and shardings, orbax checkpoints (the only orbax user),
training-loop pieces (progress, writers, NaN guard), and the arms x seeds of a HoVer-Net study.
"""
