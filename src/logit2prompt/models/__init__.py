"""Inverters: a log-prob observation in, the hidden prompt out.

`config.py` (the configs and presets), `inverter.py` (the shared base), `t5_inverter.py` (the
paper's architecture), `prefix_lm.py` (a pretrained causal LM as decoder), `features.py`,
`retrieval.py` (the neighbour memory), `checkpoint.py` (save/load), `text_inverter.py` (the
text-only baseline's model).
"""

from .config import InverterConfig, PrefixLMConfig, T5InverterConfig
from .inverter import Inverter
from .prefix_lm import PrefixLMInverter
from .t5_inverter import T5Inverter

__all__ = [
    "Inverter",
    "InverterConfig",
    "PrefixLMConfig",
    "PrefixLMInverter",
    "T5Inverter",
    "T5InverterConfig",
]
