"""The ``prunevision`` command line (console script ``prunevision``; ``python -m prunevision_cli``)."""
