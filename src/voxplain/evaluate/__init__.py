"""Quantitative evaluation of explanation maps, one module per family.

* :mod:`.faithfulness`: deletion / insertion curves and their AUC.
* :mod:`.pic`: performance information curves (AIC, SIC) as in the XRAI paper.
* :mod:`.localisation`: pointing game, relevance mass / rank, ROC AUC against a mask.
* :mod:`.randomisation`: cascading model-parameter randomisation and the random-logit check.
* :mod:`.complexity`: sparseness (Gini) and entropy.
* :mod:`.features`: tumour volume and centroid from a thresholded map.
* :mod:`.shortcut`: share of attribution on a spurious marker.
"""

from .complexity import complexity_metrics, entropy, sparseness
from .faithfulness import PerturbationCurves, deletion, insertion, perturbation_curves
from .localisation import (localisation_metrics, pointing_game, region_localisation, relevance_mass,
                           relevance_rank, roc_auc)
from .pic import AggregatePic, PicResult, aggregate_pic, pic_curves

__all__ = [
    "complexity_metrics", "entropy", "sparseness",
    "PerturbationCurves", "deletion", "insertion", "perturbation_curves",
    "localisation_metrics", "pointing_game", "region_localisation", "relevance_mass", "relevance_rank",
    "roc_auc",
    "AggregatePic", "PicResult", "aggregate_pic", "pic_curves",
]
