"""The one error type embgeom raises for bad input.

Every message names the input that was wrong and how to fix it; the command line
prints it as one line and exits with status 2.
"""


class EmbgeomError(Exception):
    """Bad input or an unusable environment, with a message that says how to fix it."""
