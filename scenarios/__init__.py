"""Named, declarative scenarios: domain shift (an unseen scanner), out-of-distribution
detection and adversarial robustness, each a set of run-config overrides.

A scenario ``NAME`` is ``NAME.toml`` here (declared run-config keys only, so
``flwr run . --run-config scenarios/NAME.toml`` accepts it), optionally ``NAME.sweep.toml``
(its comparison, a sweep file) and ``NAME.py`` (the pure code it needs, evaluated at the
hospitals). :mod:`scenarios.registry` finds and validates them; ``fedscan scenarios`` lists
them.
"""
