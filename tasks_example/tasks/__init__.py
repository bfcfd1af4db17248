"""The example's tasks package: ``python -m mqueue start default`` imports
every module in it (``--tasks`` defaults to ``tasks``)."""
