"""Scoring methods: the slice harness, whole-volume quality, metrics and the report."""
