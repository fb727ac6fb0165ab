"""The seam with transformers: every private `Trainer` method SLCATrainer overrides is listed, with its
reason, in `PRIVATE_TRAINER_OVERRIDES`, and each still exists on the installed `Trainer` (an upgrade that
renames one fails here, not silently in a user's run)."""

import inspect

from transformers import Trainer

from slca_peft.method.trainer import PRIVATE_TRAINER_OVERRIDES, SLCATrainer


def private_overrides(cls: type) -> set[str]:
    """Private (single-underscore) methods `cls` or its slca-peft bases define that `Trainer` also has."""
    names = set()
    for klass in cls.__mro__:
        if klass.__module__.startswith("slca_peft"):
            names |= {name for name, value in vars(klass).items() if name.startswith("_") and not
                      name.startswith("__") and callable(value) and hasattr(Trainer, name)}
    return names


def test_every_private_override_is_listed_with_its_reason():
    assert private_overrides(SLCATrainer) == set(PRIVATE_TRAINER_OVERRIDES)
    assert all(len(reason) > 20 for reason in PRIVATE_TRAINER_OVERRIDES.values())


def test_every_listed_method_is_still_a_method_of_trainer():
    missing = [name for name in PRIVATE_TRAINER_OVERRIDES if not inspect.isfunction(getattr(Trainer, name, None))]
    assert missing == []


def test_the_check_finds_an_unlisted_override():
    class Sneaky(SLCATrainer):
        def _inner_training_loop(self, *args, **kwargs):  # a private Trainer method, not in the list
            return super()._inner_training_loop(*args, **kwargs)

    Sneaky.__module__ = "slca_peft.method.sneaky"
    assert private_overrides(Sneaky) - set(PRIVATE_TRAINER_OVERRIDES) == {"_inner_training_loop"}
