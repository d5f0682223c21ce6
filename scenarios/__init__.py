"""Named, declarative scenarios: domain shift (an unseen scanner), out-of-distribution
detection and adversarial robustness, each a set of run-config overrides.

Nothing lives here yet; it arrives with the scenario issues.
"""
