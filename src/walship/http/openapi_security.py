"""The OpenAPI schema's account of authentication: schemes, and per operation what it needs.

Drawn from ``auth.ROUTE_ACCESS``, the same table the middleware enforces, so the document
cannot drift from the behaviour.
"""

from __future__ import annotations

import re
from typing import Any

from walship.http.auth import ROUTE_ACCESS, TenantScope

_SCHEMES = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key (`wsk_…`, from `walship keys create`), a JWT (with "
        "`--jwt-key-file`) or the admin token.",
    },
    "apiKey": {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "An API key (`wsk_…`).",
    },
}
_ERROR = {"$ref": "#/components/schemas/ErrorBody"}


def describe_security(schema: dict[str, Any]) -> None:
    """Add the security schemes, and to each guarded operation its security and 401/403."""
    schema.setdefault("components", {})["securitySchemes"] = _SCHEMES
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            access = _BY_SCHEMA_KEY.get(f"{method.upper()} {path}")
            if access is None or access.role is None:
                operation["security"] = []
                continue
            operation["security"] = [{"bearer": []}, {"apiKey": []}]
            scope = {
                TenantScope.BODY: " Every event must be in a tenant of the key.",
                TenantScope.FILTER: " Reads only the key's tenants; naming another is 403.",
                TenantScope.NONE: "",
            }[access.tenants]
            if access.tenants_all:
                scope = " A key limited to some tenants is refused."
            operation["description"] = (
                operation.get("description", "") + f"\n\nNeeds role `{access.role}`.{scope}"
            ).strip()
            responses = operation.setdefault("responses", {})
            responses["401"] = {
                "description": "No credentials, or unknown ones (`unauthorized`)",
                "content": {"application/json": {"schema": _ERROR}},
            }
            responses["429"] = {
                "description": "The key is over its rate or in-flight limit (`rate_limited`); "
                "`Retry-After` says when to try again",
                "content": {"application/json": {"schema": _ERROR}},
            }
            responses["403"] = {
                "description": "The key's role or tenants do not cover this (`forbidden`)",
                "content": {"application/json": {"schema": _ERROR}},
            }


# the schema prints ``{entity_id:path}`` as ``{entity_id}``
_BY_SCHEMA_KEY = {re.sub(r":\w+}", "}", key): access for key, access in ROUTE_ACCESS.items()}
