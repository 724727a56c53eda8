"""What hosts the service: systemd's notify protocol, the classic daemon, the metrics endpoint."""
