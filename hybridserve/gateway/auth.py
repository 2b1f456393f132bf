"""API keys: `Authorization: Bearer KEY` checked against sha256 hashes from config or env.

Keys are never stored in clear: models.yaml lists `gateway.api_key_hashes` and the
environment variable named by `gateway.api_keys_env` (default HYBRIDSERVE_API_KEYS)
may add more, comma-separated. `auth: required` (the default) with no key at all is
a startup error, so an endpoint is never left open by accident; `auth: disabled`
is the one explicit way to run without keys.

A key's id (its sha256) is also its tenant: agent sessions belong to the key that
opened them (`tenant`). With auth disabled every caller is the one public tenant.
"""
from __future__ import annotations

import hashlib
import os
import re
from typing import Mapping

from hybridserve.config import ConfigError, GatewayConfig
from hybridserve.errors import AuthenticationError
from hybridserve.gateway.governor import PUBLIC

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def hash_key(key: str) -> str:
    """sha256 hex of an API key: the form models.yaml and the env var store."""
    return hashlib.sha256(key.encode()).hexdigest()


def env_key_hashes(var: str, environ: Mapping[str, str]) -> set[str]:
    out = set()
    for item in environ.get(var, "").split(","):
        item = item.strip().lower()
        if not item:
            continue
        if not _HEX64.match(item):
            raise ConfigError(f"${var} must hold sha256 hex digests separated by commas, not keys; "
                              "make one with `hybridserve hash-key KEY`")
        out.add(item)
    return out


class KeyChecker:
    """Decides whether a request's Authorization header carries a known key."""

    def __init__(self, gateway: GatewayConfig, environ: Mapping[str, str] | None = None):
        environ = os.environ if environ is None else environ
        self.required = gateway.auth == "required"
        self.hashes = set(gateway.api_key_hashes) | env_key_hashes(gateway.api_keys_env, environ)
        if self.required and not self.hashes:
            raise ConfigError(
                "gateway.auth is 'required' but no API key is configured: add sha256 hashes to "
                f"gateway.api_key_hashes or ${gateway.api_keys_env} (`hybridserve hash-key KEY`), "
                "or set `gateway.auth: disabled` for local use")

    def check(self, authorization: str | None) -> str | None:
        """The key's sha256 (its identity for budgets), or None when auth is off and none was sent."""
        if not self.required:
            scheme, _, key = (authorization or "").partition(" ")
            return hash_key(key.strip()) if scheme.lower() == "bearer" and key.strip() else None
        if not authorization:
            raise AuthenticationError("missing API key: send `Authorization: Bearer KEY`")
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthenticationError("malformed Authorization header: use `Bearer KEY`")
        digest = hash_key(key.strip())
        if digest not in self.hashes:
            raise AuthenticationError("invalid API key")
        return digest

    def tenant(self, key_id: str | None) -> str:
        """Who owns the sessions a caller opens: the key's id when keys are required, else
        the one public tenant (a bearer token sent to an open gateway proves nothing)."""
        return key_id if self.required and key_id else PUBLIC
