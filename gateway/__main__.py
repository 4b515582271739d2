"""``python -m gateway ...``: the same as the ``careconnect-gateway`` command."""

from gateway.cli import main

raise SystemExit(main())
