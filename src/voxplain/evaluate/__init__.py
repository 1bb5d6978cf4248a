"""Quantitative evaluation of explanation maps, one module per family.

* :mod:`.faithfulness`: deletion / insertion curves and their AUC.
* :mod:`.pic`: performance information curves (AIC, SIC) as in the XRAI paper.
* :mod:`.localisation`: pointing game, relevance mass / rank, ROC AUC against a mask.
* :mod:`.randomisation`: cascading model-parameter randomisation and the random-logit check.
* :mod:`.complexity`: sparseness (Gini) and entropy.
* :mod:`.features`: tumour volume and centroid from a thresholded map.
* :mod:`.shortcut`: share of attribution on a spurious marker.
* :mod:`.runner` / :mod:`.output` / :mod:`.cohort`: every metric for every method over
  a set of cases, written as metrics.json / metrics.csv / plots / report.html
  (``voxplain evaluate``).

Every metric takes maps of shape (B, C, *spatial) with 1 to 3 spatial dimensions
and returns one value per sample; each module's docstring says what it returns on
degenerate input (empty mask, constant map).
"""

from .complexity import complexity_metrics, entropy, sparseness
from .faithfulness import PerturbationCurves, deletion, insertion, perturbation_curves
from .localisation import (localisation_metrics, pointing_game, region_localisation, relevance_mass,
                           relevance_rank, roc_auc)
from .features import feature_errors, threshold_map
from .output import write_evaluation
from .pic import AggregatePic, PicResult, aggregate_pic, pic_curves
from .randomisation import CascadingResult, cascading_randomisation, map_similarity, random_logit
from .runner import EvalCase, EvaluationResult, evaluate_cases
from .shortcut import marker_share

__all__ = [
    "complexity_metrics", "entropy", "sparseness",
    "PerturbationCurves", "deletion", "insertion", "perturbation_curves",
    "localisation_metrics", "pointing_game", "region_localisation", "relevance_mass", "relevance_rank",
    "roc_auc",
    "AggregatePic", "PicResult", "aggregate_pic", "pic_curves",
    "feature_errors", "threshold_map", "write_evaluation",
    "CascadingResult", "cascading_randomisation", "map_similarity", "random_logit",
    "EvalCase", "EvaluationResult", "evaluate_cases", "marker_share",
]
