"""actpack: compress the activations autograd saves for backward.

Example::

    import actpack
    with actpack.compress("actnn"):
        loss = model(x).sum()
    loss.backward()
"""

from actpack.api import Report, compress, engine_of, measure, unwrap, wrap
from actpack.engine import Engine
from actpack.strategies import (
    STRATEGY_NAMES,
    ActNN,
    Cast16,
    Division,
    Exact,
    Int8,
    SaveInfo,
    Strategy,
    resolve,
)

__version__ = "0.1.0"

__all__ = [
    "STRATEGY_NAMES",
    "ActNN",
    "Cast16",
    "Division",
    "Engine",
    "Exact",
    "Int8",
    "Report",
    "SaveInfo",
    "Strategy",
    "compress",
    "engine_of",
    "measure",
    "resolve",
    "unwrap",
    "wrap",
]
