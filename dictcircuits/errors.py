"""The one exception type users see: a single line saying what was wrong and what to do."""


class DictCircuitsError(Exception):
    """Bad input or an unsupported request; the CLI prints it as one line and exits with status 2."""
