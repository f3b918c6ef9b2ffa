"""The user-facing shortcut to the inverter class: `from logit2prompt.inverter import Inverter`,
then `Inverter.from_pretrained("default")`. The code lives in `logit2prompt.models`."""

from .models.inverter import Inverter

__all__ = ["Inverter"]
