"""Cohorts on a Dask cluster: ``voxplain explain`` and ``evaluate`` with ``--workers N`` or ``--scheduler ADDRESS``.

Dask distributed is the engine (no scheduler of voxplain's own): one task per case,
the model loaded once per worker, inputs and outputs through a folder every worker
can read. Each case's output is written atomically and carries the fingerprint of
the settings that made it, so the same command run again skips complete cases.
Without ``--workers``/``--scheduler`` the commands run their cases one after another
in one process, through the same per-case code.
"""

from .evaluate import run_evaluate_cohort
from .explain import CohortResult, run_explain_cohort

__all__ = ["run_explain_cohort", "run_evaluate_cohort", "CohortResult"]
