"""DiffMix virtual label maps (NumPy only): the tile tables, balancing and enlarging.

`tiles` builds the per-id tables of a real tile and the patch grid; `balancing` pastes rare nuclei
over common ones (docs/method.md §2.2, §2.4); `enlarging` moves interior nuclei within each grid
patch (§3.2-§3.3). The `mix_labels` stage runs them and writes the maps.
"""
