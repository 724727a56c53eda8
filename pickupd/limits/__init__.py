"""Provider limits: what a relay or a login may send, and when."""
