"""The one exception type that the CLI turns into a single clear line instead of a traceback."""


class PathsegError(Exception):
    """A problem with the user's input, files or settings; its message names the culprit and the fix."""
