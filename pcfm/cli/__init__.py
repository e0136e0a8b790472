"""The ``pcfm`` command line."""
