"""``careconnect-gateway dev-token`` and ``careconnect-gateway api-key new``."""

from __future__ import annotations

import argparse
import secrets
import sys
from typing import Any

from gateway.settings import Settings


def cmd_dev_token(args: argparse.Namespace) -> int:
    from gateway.auth.config import is_production
    from gateway.auth.devkeys import mint_dev_token
    from gateway.auth.errors import AuthConfigError
    from gateway.auth.principal import parse_scope

    settings = Settings.from_env(data_dir=args.data_dir, mappings_dir=args.mappings)
    try:
        production = is_production(settings)
    except AuthConfigError as exc:
        print(f"dev-token: {exc}", file=sys.stderr)
        return 2
    if production:
        print("dev-token: refused: this is a production configuration (CCG_ENV=production or "
              "a mapping directory other than the bundled demo); its gateway does not trust "
              "the development key", file=sys.stderr)
        return 2
    bad = [s for s in args.scope.split() if parse_scope(s) is None]
    if bad:
        print(f"dev-token: not SMART resource scopes: {' '.join(bad)}", file=sys.stderr)
        return 2
    if "patient/" in args.scope and not args.patient:
        print("dev-token: patient/ scopes need --patient ID", file=sys.stderr)
        return 2
    print(mint_dev_token(settings.data_dir, args.scope, patient=args.patient,
                         client_id=args.client_id, subject=args.subject,
                         lifetime=args.lifetime, role=args.role))
    return 0


def cmd_api_key_new(args: argparse.Namespace) -> int:
    import yaml

    from gateway.auth.apikeys import sha256_hex

    key = secrets.token_urlsafe(32)
    entry: dict[str, Any] = {"client_id": args.client_id, "sha256": sha256_hex(key),
                             "scopes": args.scope}
    if args.role:
        entry["role"] = args.role
    print(f"# API key for {args.client_id} (give it to the client; it is not stored):",
          file=sys.stderr)
    print(key, file=sys.stderr)
    print("# add to the keys: list of CCG_API_KEYS_FILE:", file=sys.stderr)
    print(yaml.safe_dump([entry], sort_keys=False), end="")
    return 0


def register(sub: Any) -> None:
    from pathlib import Path

    dev = sub.add_parser(
        "dev-token", help="mint an access token the demo gateway trusts (development only)")
    dev.add_argument("--scope", default="user/*.read",
                     help="SMART scopes, space-separated (default: user/*.read)")
    dev.add_argument("--patient", help="the patient launch context (needed by patient/ scopes)")
    dev.add_argument("--client-id", default="dev-client",
                     help="the client_id claim (default dev-client)")
    dev.add_argument("--subject", default="dev-user", help="the sub claim (the user)")
    dev.add_argument("--lifetime", type=int, default=3600, help="seconds (default 3600)")
    dev.add_argument("--role", help="the role claim (gateway-admin: may ask for diagnostics, "
                                    "X-Explain)")
    dev.add_argument("--data-dir", type=Path, help="where the dev key is kept (as serve)")
    dev.add_argument("--mappings", type=Path, help=argparse.SUPPRESS)
    dev.set_defaults(func=cmd_dev_token)

    api_key = sub.add_parser("api-key", help="application-restricted API keys")
    from gateway.cli import _group

    ksub = _group(api_key, "api_key_command")
    new = ksub.add_parser("new", help="generate a key; print it (stderr) and its entry (stdout)")
    new.add_argument("--client-id", required=True,
                     help="the client the key identifies (in the audit trail and rate limits)")
    new.add_argument("--scope", required=True, help="system/ scopes, e.g. 'system/*.read'")
    new.add_argument("--role", help="the client's role (gateway-admin: may ask for "
                                    "diagnostics, X-Explain)")
    new.set_defaults(func=cmd_api_key_new)
