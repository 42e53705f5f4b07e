"""Prepare: read sources, find duplicates and patients, split, write; read a prepared dataset back."""
