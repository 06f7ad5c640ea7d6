"""`python -m candela_mitm.audit ...`: the same commands as `candela audit ...`."""

from __future__ import annotations

import sys

from candela_mitm.audit.cli import audit_main

sys.exit(audit_main(sys.argv[1:]))
