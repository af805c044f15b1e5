"""One module per ``ucan`` subcommand; each only parses its options and calls the library.

Each defines ``configure(parser)`` and ``run(args) -> int``; :mod:`ucan_smoothing.cli` lists them.
"""
