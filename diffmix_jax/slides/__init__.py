"""Whole-slide prediction (docs/slides.md): reading at the model's µm/px (`reading`), tissue (`tissue`),
chunks and exact stitching across their edges (`chunks`), the overlapped per-slide run (`pipeline`),
streamed outputs (`writers`), a cohort's shared state on disk (`cohort`) and the loop over many
slides (`runner`).
"""
