"""The one parser: a dropped file's header section -> envelope, the address grammar, long lines."""
