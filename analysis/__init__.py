"""Studies that use ``interp_steer`` (never imported by it): dHS per layer, gradient → steering mapping,
PCA vs learned directions, and the figures (``python -m analysis.figures --help``).

Modules:
    dhs              dHS = hs_cho − hs_rej per layer, its spectrum, and its overlap with weight subspaces
    gradients        gradients of the noref and the training loss per layer, against PCA / mean-diff / learned
    pca_vs_learned   the PCA subspace of dHS against the adapter's output subspace, per layer and over training
    study            the real-model study the figures draw: one quick adapter and every capture, computed once
    figures          one command per figure (PNG + SVG into ``figures/``)
    benchmark        speed ratios against a plain forward (``make bench``)
"""
