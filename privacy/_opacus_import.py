"""Import Opacus without its side effect on logging.

``opacus.utils.module_utils`` calls ``logging.basicConfig`` at import, which gives the
root logger a handler: every Flower log line would then be printed twice. Modules of
this package import this one next to their Opacus imports; it imports Opacus and
removes that handler again (recognised by Opacus' format string), in whichever order
the imports run.
"""

from __future__ import annotations

import logging

import opacus.utils.module_utils  # noqa: F401  (the import with the side effect)

_OPACUS_FORMAT = "%(asctime)s:%(levelname)s:%(message)s"

_root = logging.getLogger()
for _handler in _root.handlers[:]:
    if _handler.formatter is not None and _handler.formatter._fmt == _OPACUS_FORMAT:
        _root.removeHandler(_handler)
