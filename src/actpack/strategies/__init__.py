"""Strategies: small objects with validated knobs that encode saved float tensors.

One strategy per file: :mod:`~actpack.strategies.cast` (16-bit casts),
:mod:`~actpack.strategies.actnn` (ActNN per-group quantization, Int8),
:mod:`~actpack.strategies.division` (DIVISION), :mod:`~actpack.strategies.levels`
(ActNN L0-L2), :mod:`~actpack.strategies.mixed` (ActNN L3-L5 mixed precision,
with :mod:`~actpack.strategies.allocate` and :mod:`~actpack.strategies.mixedcode`)
and :mod:`~actpack.strategies.rows` (ActNN with token-row groups for transformers).
"""

from actpack.strategies.actnn import ActNN, Int8, parse_level
from actpack.strategies.base import Exact, SaveInfo, Strategy
from actpack.strategies.cast import Cast16
from actpack.strategies.division import Division
from actpack.strategies.levels import LEVELS, ActNNPreset
from actpack.strategies.mixed import ActNNMixed
from actpack.strategies.registry import DEFAULT_STRATEGY, STRATEGY_NAMES, resolve
from actpack.strategies.rows import RowActNN

__all__ = [
    "DEFAULT_STRATEGY",
    "LEVELS",
    "STRATEGY_NAMES",
    "ActNN",
    "ActNNMixed",
    "ActNNPreset",
    "Cast16",
    "Division",
    "Exact",
    "Int8",
    "RowActNN",
    "SaveInfo",
    "Strategy",
    "parse_level",
    "resolve",
]
