"""Scoring models on a labelled set: metrics with intervals, calibration figures, the overlap guard."""
