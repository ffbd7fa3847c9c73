"""The one exception type that the CLI turns into a single clear line instead of a traceback."""


class PathsegError(Exception):
    """A problem with the user's input, files or settings; its message names the culprit and the fix."""


class ReportedElsewhere(PathsegError):
    """The same error, on a process whose peer reports it (the other ranks of a data-parallel run): exit quietly."""
