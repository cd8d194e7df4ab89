"""CLI subcommands: each module parses its arguments and calls the stage functions it names."""
