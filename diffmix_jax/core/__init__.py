"""Shared machinery of the stages: device mesh and shardings (`sharding`), orbax checkpoints (the only
orbax user), the one training loop of both trainers (`loop`: steps, interval means, cadence, resume,
NaN guard), writers and progress (`writers`), Adam, its schedule and the EMA (`optim`), and the arms x
seeds of a HoVer-Net study (`arms`). Nothing here imports the data package.
"""
