"""Launcher of an Atropos + verl run: environment service, optional inference workers, trainer
(evaluate mode), or run-api, trainer and Atropos environments (trajectory mode).

``recipe/atropos/launch_atropos_verl_services.py`` is the command; this package holds its parts,
one job per module:

- :mod:`.config`: the ``launcher:`` section of a recipe config, read with Hydra's compose API and
  checked field by field.
- :mod:`.spec`: what a plan is made of (services, registrations, the policy endpoint, the plan).
- :mod:`.plan`: the concrete commands, ports and order of one launch, built from the config.
- :mod:`.dry_run`: what ``--dry-run`` prints of a plan.
- :mod:`.process`: one child process in its own session, its log file, and killing its whole tree.
- :mod:`.health`: port checks and waiting for ``/health``.
- :mod:`.console`: echoing the services' log files to the console, prefixed.
- :mod:`.supervisor`: start order, endpoint registration, restarts, shutdown.
- :mod:`.cli`: argument parsing, signals and exit codes.

Nothing here imports verl, torch or Ray: the launcher must start in well under a second.
"""
