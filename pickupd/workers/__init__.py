"""The dispatcher processes of one service: shares, the supervisor, the uplink."""
