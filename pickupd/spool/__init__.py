"""The queue as directories: the folders, safe file primitives, the sidecar, the operator's
moves, recovery, stranded claims."""
