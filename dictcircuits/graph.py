"""Circuit graphs: the public names of the circuit pipeline (dictcircuits.circuit), kept importable from here."""
from .circuit import *  # noqa: F401,F403
from .circuit import __all__  # noqa: F401
