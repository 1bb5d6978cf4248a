"""Medical image data: NIfTI and BraTS loading, image folders, preprocessing, datasets, phantoms.

Modules: :mod:`~voxplain.data.nifti` (any NIfTI in RAS, save aligned with the
source), :mod:`~voxplain.data.brats` (BraTS case folders), :mod:`~voxplain.data.images`
(2D image folders), :mod:`~voxplain.data.preprocess` (z-score, crop/pad, label
regions), :mod:`~voxplain.data.datasets` (torch Datasets and splits) and
:mod:`~voxplain.data.phantom` (the synthetic BraTS-like cohort).
"""

from .brats import MODALITIES, BratsCase, find_brats_cases, load_brats_case
from .datasets import (BratsCohortDataset, ImageFolderDataset, SliceDataset, split_indices,
                       train_val_split)
from .images import find_images, load_image
from .nifti import NiftiMeta, load_nifti, save_nifti_like, write_nifti
from .phantom import generate_cohort, generate_subject
from .preprocess import REGIONS, crop_or_pad, default_crop_size, labels_to_regions, zscore_nonzero
from .template import load_template

__all__ = [
    "MODALITIES", "REGIONS", "BratsCase", "find_brats_cases", "load_brats_case",
    "BratsCohortDataset", "ImageFolderDataset", "SliceDataset", "split_indices", "train_val_split",
    "find_images", "load_image",
    "NiftiMeta", "load_nifti", "save_nifti_like", "write_nifti",
    "generate_cohort", "generate_subject", "load_template",
    "crop_or_pad", "default_crop_size", "labels_to_regions", "zscore_nonzero",
]
