"""Import Opacus without its side effect on logging.

``opacus.utils.module_utils`` calls ``logging.basicConfig`` at import, which gives the
root logger a handler: every Flower log line would then be printed twice. Modules of
this package import Opacus through here, which removes that handler again.
"""

from __future__ import annotations

import logging

_root = logging.getLogger()
_before = list(_root.handlers)
import opacus.utils.module_utils  # noqa: E402,F401  (the import with the side effect)

for _handler in _root.handlers[:]:
    if _handler not in _before:
        _root.removeHandler(_handler)
