"""casruns: a durable, filesystem-native run registry for headless sandbox runs.

``casruns.Registry`` is the API; the ``casruns`` command is a thin layer over it.
Imports stay light: ``import casruns`` loads neither click, zstandard nor plugins.
"""

from .errors import CasrunsError
from .registry import Registry, default_root

__all__ = ["Registry", "CasrunsError", "default_root"]
__version__ = "0.2.0"
