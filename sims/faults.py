"""Unreliable hospitals: which hospital fails in which round, and how a corrupt update looks.

Pure functions of ``(seed, hospital, round)``: the same seed gives the same faults in any
process, in any order, on a resume too. The hospital (the ClientApp) injects its own fault;
the server never learns the schedule and has to detect every bad reply itself.

Kinds, drawn once per hospital and round from one uniform number ``u``:

- ``crash``: the hospital trains (spending its privacy budget), then fails before its reply
  is sent; the server gets an error reply.
- ``straggle``: the hospital trains, then replies only after the round's timeout.
- ``corrupt``: the hospital replies with a corrupt update (NaN or Inf weights, a wrong
  shape or a wrong dtype).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FAULT_KINDS = ("crash", "straggle", "corrupt")
CORRUPTIONS = ("nan", "inf", "shape", "dtype")
CORRUPT_KINDS = (*CORRUPTIONS, "mixed")


@dataclass(frozen=True)
class FaultSpec:
    """How unreliable the hospitals are (``faults.*`` run-config keys).

    Parameters
    ----------
    crash_rate, straggle_rate, corrupt_rate : float
        Probability, per hospital and round, of each fault; each in [0, 1], sum <= 1.
    corrupt_kind : str
        One of :data:`CORRUPT_KINDS`; ``"mixed"`` draws one of :data:`CORRUPTIONS` per fault.
    round_timeout : float
        Seconds the server waits for the replies of one phase of a round (> 0). A straggler
        trains, then replies ``straggle_margin`` seconds after the server's deadline.
    min_available : int
        Fewest usable updates a round needs (>= 1); a round with fewer fails the run, which
        can then be resumed from its last checkpoint.
    """

    crash_rate: float = 0.0
    straggle_rate: float = 0.0
    corrupt_rate: float = 0.0
    corrupt_kind: str = "mixed"
    round_timeout: float = 600.0
    min_available: int = 1

    straggle_margin = 2.0

    @property
    def any(self) -> bool:
        return self.crash_rate + self.straggle_rate + self.corrupt_rate > 0


def fault_for(spec: FaultSpec, *, seed: int, site: int, server_round: int) -> str | None:
    """The fault hospital ``site`` suffers in ``server_round``, or ``None``."""
    if not spec.any:
        return None
    from sims.seeding import make_rng  # torch, only where faults are drawn

    u = make_rng(seed, site, server_round, "fault").random()
    for kind, rate in zip(FAULT_KINDS, (spec.crash_rate, spec.straggle_rate, spec.corrupt_rate), strict=True):
        if u < rate:
            return kind
        u -= rate
    return None


def corruption_for(spec: FaultSpec, *, seed: int, site: int, server_round: int) -> str:
    """Which corruption a ``corrupt`` fault applies (one of :data:`CORRUPTIONS`)."""
    if spec.corrupt_kind != "mixed":
        return spec.corrupt_kind
    from sims.seeding import make_rng

    return CORRUPTIONS[int(make_rng(seed, site, server_round, "corruption").integers(len(CORRUPTIONS)))]


def corrupt_arrays(arrays: dict[str, np.ndarray], corruption: str) -> dict[str, np.ndarray]:
    """A corrupt copy of a model update (``name -> array``), as a faulty hospital would send.

    ``nan``/``inf`` poison the first floating-point array; ``shape`` drops the last row of
    the first array; ``dtype`` sends every array as float16.
    """
    out = {k: np.array(v, copy=True) for k, v in arrays.items()}
    first = next(iter(out))
    if corruption in ("nan", "inf"):
        out[first].reshape(-1)[0] = np.nan if corruption == "nan" else np.inf
    elif corruption == "shape":
        out[first] = out[first][:-1] if out[first].ndim else out[first].reshape(1)
    elif corruption == "dtype":
        out = {k: v.astype(np.float16) for k, v in out.items()}
    else:
        raise ValueError(f"The 'corruption' parameter of corrupt_arrays must be one of {', '.join(CORRUPTIONS)}. "
                         f"Got {corruption!r} instead.")
    return out
