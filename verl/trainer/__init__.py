"""Overlay package (see verl/_overlay.py): modules this repo lacks come from the installed verl."""

from verl import _overlay

_overlay.exec_installed(globals())
