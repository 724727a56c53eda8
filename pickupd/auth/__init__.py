"""Logins: the model (passwords, OAuth2), the token cache, the token sources."""
