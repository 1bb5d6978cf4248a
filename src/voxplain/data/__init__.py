"""Medical image data: NIfTI and BraTS loading, image folders, preprocessing, datasets, phantoms.

Modules: :mod:`~voxplain.data.nifti` (any NIfTI in RAS, save aligned with the
source), :mod:`~voxplain.data.brats` (BraTS case folders), :mod:`~voxplain.data.images`
(2D image folders), :mod:`~voxplain.data.preprocess` (z-score, crop/pad, label
regions), :mod:`~voxplain.data.datasets` (torch Datasets and splits) and
:mod:`~voxplain.data.phantom` (the synthetic BraTS-like cohort).
"""

from .nifti import NiftiMeta, load_nifti, save_nifti_like, write_nifti
from .phantom import generate_cohort, generate_subject
from .template import load_template

__all__ = [
    "NiftiMeta", "load_nifti", "save_nifti_like", "write_nifti",
    "generate_cohort", "generate_subject", "load_template",
]
