"""The one exception type that means "the user asked for something we cannot do"."""


class UserError(Exception):
    """A mistake in the user's input (bad path, bad option, bad labels).

    The CLI prints these as one line on stderr and exits non-zero; anything else
    is a bug and keeps its traceback.
    """


_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    """A one-line warning on stderr, printed once per process (settings that fall back, such as --compile)."""
    import sys

    if message not in _WARNED:
        _WARNED.add(message)
        print(f"diffusion-classifier: warning: {message}", file=sys.stderr, flush=True)
