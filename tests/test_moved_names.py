"""Names that moved between modules stay importable from where earlier versions documented them."""

import pytest


@pytest.mark.parametrize(("old", "new", "name"), [
    ("slca_peft.checkpoint", "slca_peft.model", "load_checkpoint"),
    ("slca_peft.checkpoint", "slca_peft.files", "atomic_directory"),
    ("slca_peft.checkpoint", "slca_peft.files", "atomic_write_text"),
    ("slca_peft.peft_methods", "slca_peft.adapters", "load_peft_config"),
    ("slca_peft.peft_methods", "slca_peft.adapters", "apply_peft_config"),
])
def test_a_moved_name_is_the_same_object_at_its_old_path(old, new, name):
    import importlib

    assert getattr(importlib.import_module(old), name) is getattr(importlib.import_module(new), name)


def test_an_unknown_name_is_still_an_attribute_error():
    import slca_peft.checkpoint

    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        slca_peft.checkpoint.nope  # noqa: B018
