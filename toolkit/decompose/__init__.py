"""Tokenwise decomposition of layer updates (arXiv 2604.02459): local maps, residuals, geometry.

The pure-tensor core takes training pairs ``(h_l, h_{l+1})`` ``[N, d]`` and test anchors ``[M, d]``:

* :mod:`.neighbours`       exact cosine kNN (``knn_cosine``)
* :mod:`.function_classes` diag_local / diag_global / lowrank / orthogonal / mlp, plain or update form
* :mod:`.interpolate`      distance-weighted mixing of nearby anchors' maps
* :mod:`.geometry`         RelErr, cosines and angles of update / tokenwise / residual, spectral fractions

Interventions (patch ``T(h_l)`` in and measure KL) and statistics live in :mod:`.interventions` and
:mod:`.statistics`, imported from their modules.

Example:
    >>> import torch
    >>> X = torch.randn(400, 16, dtype=torch.float64); Y = X + 0.1 * torch.tanh(X)
    >>> fit = fit_tokenwise(X[:300], Y[:300], X[300:], "lowrank", k=64, rank=8, form="update")
    >>> g = tokenwise_geometry(X[300:], Y[300:], fit)
    >>> g.rel_err.shape
    torch.Size([100])
"""
from toolkit.decompose.function_classes import (FORMS, FUNCTION_CLASSES, LOCAL_CLASSES, GlobalDiagMap, LocalFit,
                                                MLPMap, fit_global_diag, fit_local_maps, fit_mlp, fit_mlps,
                                                fit_tokenwise)
from toolkit.decompose.geometry import (GeometryMetrics, angle_degrees, cosine, energy_fraction, random_baseline,
                                        relative_error, tokenwise_geometry)
from toolkit.decompose.interpolate import InterpolatedFit, distance_weights, interpolate_maps
from toolkit.decompose.neighbours import knn_cosine

__all__ = [
    # neighbours
    "knn_cosine",
    # function classes
    "FUNCTION_CLASSES", "LOCAL_CLASSES", "FORMS", "LocalFit", "GlobalDiagMap", "MLPMap",
    "fit_local_maps", "fit_global_diag", "fit_mlp", "fit_mlps", "fit_tokenwise",
    # interpolation
    "InterpolatedFit", "distance_weights", "interpolate_maps",
    # geometry
    "GeometryMetrics", "tokenwise_geometry", "relative_error", "cosine", "angle_degrees", "energy_fraction",
    "random_baseline",
]
