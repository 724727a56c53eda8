"""TOML -> frozen Config: loading, the key table, routing, reading logins."""
