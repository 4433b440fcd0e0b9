"""actpack: compress the activations autograd saves for backward.

Example::

    import actpack
    with actpack.compress():  # "actnn-rows"; or "actnn", "division", "int8", ...
        loss = model(x).sum()
    loss.backward()
"""

from actpack.api import compress, engine_of, measure, unwrap, wrap
from actpack.engine import Engine
from actpack.noise import NoiseReport, gradient_noise
from actpack.report import Report
from actpack.strategies import (
    DEFAULT_STRATEGY,
    LEVELS,
    STRATEGY_NAMES,
    ActNN,
    ActNNMixed,
    ActNNPreset,
    Cast16,
    Division,
    Exact,
    Int8,
    RowActNN,
    SaveInfo,
    Strategy,
    resolve,
)
from actpack.strategies.allocate import Allocation, allocate_bits

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_STRATEGY",
    "LEVELS",
    "STRATEGY_NAMES",
    "ActNN",
    "ActNNMixed",
    "ActNNPreset",
    "Allocation",
    "Cast16",
    "Division",
    "Engine",
    "Exact",
    "Int8",
    "NoiseReport",
    "Report",
    "RowActNN",
    "SaveInfo",
    "Strategy",
    "allocate_bits",
    "compress",
    "engine_of",
    "gradient_noise",
    "measure",
    "resolve",
    "unwrap",
    "wrap",
]
