"""Evaluation protocols on frozen features."""

from ssroute.eval.knn import knn_accuracy, knn_predict
from ssroute.eval.linear import linear_probe_accuracy

__all__ = ["knn_accuracy", "knn_predict", "linear_probe_accuracy"]
