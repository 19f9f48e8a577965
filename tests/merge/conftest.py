from __future__ import annotations

import pytest

from tests.merge.helpers import save_peft_adapter


@pytest.fixture(scope="session")
def make_adapter(tmp_path_factory):
    """`make_adapter(base, seed=0, **LoraConfig kwargs) -> Path`, cached per arguments."""
    made = {}

    def make(base, *, seed=0, std=0.05, **lora):
        key = (str(base), seed, std, repr(sorted(lora.items())))
        if key not in made:
            made[key] = save_peft_adapter(base, tmp_path_factory.mktemp("adapter") / "adapter", seed=seed, std=std, **lora)
        return made[key]

    return make
