"""Evaluation: per-case overlap scores, the result matrix R[stage][task], continual metrics, plots, reports.

Kept free of nnunetv2 imports so results can be re-scored and re-reported without a training install.
"""
from lifelong_nnunet.evaluation.continual import continual_metrics, reference_gaps, result_matrix, stage_labels
from lifelong_nnunet.evaluation.metrics import score_case

__all__ = ["score_case", "result_matrix", "stage_labels", "continual_metrics", "reference_gaps"]
