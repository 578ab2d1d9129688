"""Gateway policy: virtual keys with roles, and per-key and per-tenant rate limits kept in a store (an
in-process one for a single gateway, Redis for several)."""
