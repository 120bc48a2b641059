"""The one exception type that means "the user asked for something we cannot do"."""


class UserError(Exception):
    """A mistake in the user's input (bad path, bad option, bad labels).

    The CLI prints these as one line on stderr and exits non-zero; anything else
    is a bug and keeps its traceback.
    """
