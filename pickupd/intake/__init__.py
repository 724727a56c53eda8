"""The intake step: what to work on next. File events from the pickup folder (watcher), the
fair queues of new and due mail and the deferred messages' due times (queues, duetimes)."""
