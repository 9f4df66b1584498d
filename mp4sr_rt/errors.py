"""Errors that reach the user as one clear message and a non-zero exit, never a traceback."""


class UserError(Exception):
    """Bad input or configuration: the message names the file or field at fault."""

    exit_code = 2


class ArtifactError(UserError):
    """An artifact directory that is missing, corrupted or from an incompatible version."""
