"""The one exception type for problems a user can cause and fix."""


class FitscopeError(Exception):
    """A user-fixable problem. The message names the problem and the fix on one line."""
