"""One SMTP transaction, the connection's wire, the session pool."""
