"""Reports people can open: NIfTI maps, PNG figures, ``summary.json`` and a self-contained ``report.html``."""

from .figures import GridRow, comparison_grid, filter_grid, inspection_grid
from .html import render_html, write_html
from .nifti_maps import map_filename, save_map_nifti
from .study import Study
from .summary import methods_summary, prediction_summary, write_json
from .writer import ScanSpace, write_index, write_report

__all__ = [
    "Study", "ScanSpace", "write_report", "write_index", "render_html", "write_html",
    "GridRow", "comparison_grid", "inspection_grid", "filter_grid",
    "save_map_nifti", "map_filename", "prediction_summary", "methods_summary", "write_json",
]
