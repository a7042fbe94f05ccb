"""dictcircuits: circuits of sparse-dictionary features inside language models."""
from . import archs  # registers every architecture (dictcircuits/archs/, registry.py)
from .dictionary import ARCHITECTURES, Dictionary, save_dictionary
from .errors import DictCircuitsError
from .formats import convert, load_dictionaries, load_dictionary
from .models import Model, Site, Tokens, load_model
from .splice import SiteState, SpliceResult, splice
from .transcoder import Transcoder

__all__ = [
    "ARCHITECTURES", "Dictionary", "archs", "DictCircuitsError", "Model", "Site", "SiteState", "SpliceResult", "Tokens", "Transcoder",
    "convert", "load_dictionaries", "load_dictionary", "load_model", "save_dictionary", "splice",
]
__version__ = "0.1.0"
