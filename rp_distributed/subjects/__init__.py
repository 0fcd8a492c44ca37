"""Subjects: which faces of a dataset are one person. ``rp-anonymize subjects`` detects every face, describes it with
the recognizer (``describe``) and clusters the descriptors (``cluster``) into the subject table the anonymization
job reads (``pseudonyms.table``); ``metrics`` scores a clustering against true identities."""

from .cluster import METHODS, ClusterParams, cluster, subject_names
from .metrics import ClusterScores, scores

__all__ = ["METHODS", "ClusterParams", "ClusterScores", "cluster", "scores", "subject_names"]
