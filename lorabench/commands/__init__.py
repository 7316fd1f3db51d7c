"""``python -m lorabench``: the command line and its subcommands (compare, report, merge, fit, list)."""
