"""Former home of the PEFT-config helpers, now in `slca_peft.adapters` (the one adapter layer).

Kept so that imports written against earlier versions (`from slca_peft.peft_methods import
load_peft_config`) keep working.
"""

from .adapters import (  # noqa: F401
    adapter_prefix,
    apply_peft_config,
    check_peft_config,
    load_peft_config,
    peft_config_from_dict,
    peft_config_to_dict,
)
