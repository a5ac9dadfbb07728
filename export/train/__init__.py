"""Training embedding networks and same-person heads (the ``train`` extra, torch), and threshold calibration."""
