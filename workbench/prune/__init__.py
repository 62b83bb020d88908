"""Pruning and its evaluation: pruning plans, anomaly measures, the generalisation and cross-type studies."""
