"""Every event pickupd logs: the name a log line's `event` field holds, and what it says.
The one list: tests/test_events.py checks that the code logs no event missing here, that
each one here is logged, and that the README's log reference names each one.
"""

from __future__ import annotations

__all__ = ["EVENTS"]

EVENTS: dict[str, str] = {
    # One message's way (one line per claim and per outcome).
    "claimed": "a message was taken: its id, source, writer, sender, recipients, relay",
    "sent": "relayed: the recipients the relay accepted",
    "deferred": "to be tried again: the reply, and when",
    "failed": "given up: the reason code and the detail",
    "waiting": "not an attempt: over a provider limit, or its relay is suspended",
    "put_back": "not an attempt: back to deferred/ at shutdown",
    "outcome_unknown": "the connection was lost after the final dot: deferred, Message-ID kept",
    "due_clamped": "a due time beyond max_age (a clock jump, an edit): taken now",
    "internal_error": "a bug: the message counts an attempt and is deferred (traceback)",
    "ignored_file": "a name in pickup/ that is no message (or a directory), once per name",
    "unmovable": "an entry of pickup/ that cannot be claimed, once",
    "unmovable_many": "more than 10,000 such entries: the rest are not logged",
    "stranded": "a claim the spool could not take (a full disk?), retried",
    "unstranded": "a stranded claim reached its folder",
    "claim_lost": "a claim another process took over (its lease had expired)",
    "archive_failed": "a sent message could not be archived to sent/ (it is deleted)",
    # The service.
    "ready": "the service watches the pickup folder",
    "stopping": "draining after a signal",
    "stopped": "the run's counts",
    "reloaded": "a new config is in force (with `worker`)",
    "reload_failed": "a config refused at reload: the old one stays",
    "reload_needs_restart": "keys a reload cannot change (kept as they were)",
    "config_warning": "what `pickupd check` warns about, at start",
    "flushed": "SIGUSR1: every deferred message made due",
    "recovered": "a claim of a process that is gone, taken back at start",
    "lease_expired": "a claim of another host whose lease expired, taken over",
    "tmp_cleaned": "abandoned files of pickup/tmp/ removed at start",
    "leftovers_cleaned": "what crashes leave (sidecars, locks, temp files) removed at start",
    "deferred_scanned": "a full scan of deferred/ (the first, and any slow one)",
    "pickup_scanned": "a scan of pickup/ (debug level: at start, on hints, every rescan_interval)",
    "notify_failed": "systemd's notify socket could not be written",
    "service_error": "the Windows service host failed (traceback)",
    # Worker processes.
    "worker_ready": "a worker process watches its share",
    "worker_stopped": "a worker's counts at its end",
    "worker_died": "a worker ended: its exit code, when it starts again",
    "worker_start_failed": "a worker could not be started",
    "workers_not_ready": "the workers were not ready in time",
    "workers_capped": "fewer workers than asked (a limit too small to share)",
    "worker_share_covered": "the main process takes a dead worker's share meanwhile",
    "worker_share_returned": "a worker is back: its share is its own again",
    "worker_message_invalid": "a line from a worker that is not the protocol's",
    # Relays, logins and tokens.
    "relay_suspended": "a relay that does not answer: its mail waits, probed",
    "relay_resumed": "a probe got through: the mail that waited goes",
    "relay_throttled": "the provider asked to slow down: its scope paused",
    "relay_auth_failed": "the relay refused a login",
    "token_acquired": "an OAuth2 access token (never the token)",
    "token_failed": "no OAuth2 token: the source and the endpoint's answer",
    "refresh_token_refused": "a stored refresh token refused (invalid_grant): sign in again",
    "oauth2_required": "the provider wants OAuth2 for this login",
    # Provider limits and the fleet's store.
    "quota_spent": "a provider said a quota is spent: its scope paused",
    "tenant_limited": "the tenant's rate was hit: its scope paused",
    "pause_lifted": "a pause gone from the ledger: the mail that waited for it goes",
    "limit_store_down": "the fleet's store does not answer: each host on its share",
    "limit_store_up": "the store answers again: what was booked meanwhile is added",
    "limit_store_closed": "at stop: round trips to the store and the turns they carried",
    # [notify].
    "hook_ran": "an on_failed command ended well",
    "hook_failed": "an on_failed command failed (not run again)",
    "hook_timeout": "an on_failed command was killed at hook_timeout",
    "hook_dropped": "too many hooks waiting: this one is not run",
    "report_queued": "a failure report was dropped into pickup/",
    "report_failed": "a failure report could not be written",
}
