"""The one exception type a user sees.

Every mistake a user can make (a bad path, a wrong shape, a missing package, an engine built for another GPU)
raises `UserError` with a message of one line that says what is wrong and, where there is one, what fixes it.
The CLI prints it without a traceback; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake the user can fix; str() is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def require(module: str, install: str):
    """Import `module` or raise a UserError naming the package to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UserError(f"the Python package for '{module}' is missing ({exc}); install it with: {install}") from None
