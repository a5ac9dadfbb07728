"""Evaluation: verification and identification metrics, the LFW protocol, plots."""
