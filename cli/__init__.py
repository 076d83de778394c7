"""``hivemind``: the user's command line for a HiveMind node pool (see ``hivemind --help``)."""
