"""Overlay of the installed verl package (see verl/_overlay.py): runs its `__init__` unchanged."""

from verl import _overlay

_overlay.export_repo_root_to_workers()
_overlay.exec_installed(globals())
