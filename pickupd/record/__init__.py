"""The record step: an attempt's outcome into its folder, its sidecar, the log and the
metrics (recorder), the next attempt or the end of retrying (retry), and what the apps are
told of failures, `[notify]` (notify)."""
