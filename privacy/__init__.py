"""Differential privacy: DP-SGD wiring, the per-hospital privacy ledger and accounting,
budget guards and privacy-budget reports, encrypted checkpoints.

Nothing lives here yet; it arrives with the privacy and checkpoint issues.
"""
