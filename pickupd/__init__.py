"""pickupd: relays mail dropped as files in a pickup folder over SMTP."""

__version__ = "0.1.0"
