"""The chain's stages. Each module has `run(config, workdir)`: it reads and writes only the workdir
(diffmix_jax/workdir.py) through the libraries, never another stage.
"""
