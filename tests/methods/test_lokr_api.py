"""LoKr's spec and PEFT config both ways, bad input, and the ``adaptc.peft`` facade's
``LoKrConfig`` against the real ``peft`` 0.21.2."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import peft
import pytest
import torch

import adaptc
from adaptc.spec import from_peft_config
from tests.methods.test_lokr import IDS, TARGETS, run, share, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def test_peft_config_converts_both_ways() -> None:
    config = peft.LoKrConfig(
        r=4, alpha=2, rank_dropout=0.1, module_dropout=0.2, use_effective_conv2d=True,
        decompose_both=True, decompose_factor=4, rank_dropout_scale=True,
        target_modules=["q_proj"], exclude_modules=["v_proj"], init_weights="lycoris",
        layers_to_transform=[1], layers_pattern="layers",
        rank_pattern={"q_proj": 2}, alpha_pattern={"k_proj": 3},
    ).to_dict()  # fmt: skip
    config["peft_type"] = "LOKR"
    config["target_modules"] = sorted(config["target_modules"])
    config["exclude_modules"] = sorted(config["exclude_modules"])
    loaded = from_peft_config(config)
    a = loaded.adapters["default"]
    assert (a.r, a.alpha, a.init, a.decompose_factor) == (4, 2, "lycoris", 4)
    assert a.rank_pattern == {"q_proj": 2} and a.alpha_pattern == {"k_proj": 3}
    written = loaded.to_peft_config("default")
    skip = ("target_modules", "exclude_modules")
    assert {k: written[k] for k in config if k not in skip} == {
        k: v for k, v in config.items() if k not in skip
    }
    assert list(written) == list(config)
    assert from_peft_config({**config, "init_weights": False}).adapters["default"].init == "random"
    with pytest.raises(Exception, match=r"use_dora.*not supported by adaptc for LoKr"):
        from_peft_config({**config, "use_dora": True})
    with pytest.raises(Exception, match=r"init_weights='gaussian' is not supported"):
        from_peft_config({**config, "init_weights": "gaussian"})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"r": 0}, "r"),
        ({"decompose_factor": 0}, "decompose_factor must be -1 or a positive integer"),
        ({"rank_dropout": 1.0}, "rank_dropout"),
        ({"init": "gaussian"}, "init"),
    ],
)
def test_bad_fields_are_refused_naming_them(fields: dict[str, Any], message: str) -> None:
    adapter = {"method": "lokr", "targets": {"kind": "names", "names": ["q_proj"]}, **fields}
    with pytest.raises(ValueError, match=message):
        adaptc.load_spec({"version": 1, "adapters": {"default": adapter}})


def test_facade_config_and_get_peft_model_match_peft() -> None:
    from adaptc.peft import LoKrConfig, get_peft_model  # type: ignore[attr-defined]

    ours_fields = [(f.name, f.default) for f in dataclasses.fields(LoKrConfig)]
    theirs_fields = [(f.name, f.default) for f in dataclasses.fields(peft.LoKrConfig)]
    assert ours_fields == theirs_fields
    kwargs = {"r": 2, "alpha": 4, "target_modules": TARGETS, "task_type": "CAUSAL_LM"}
    assert LoKrConfig(**kwargs).to_dict() == peft.LoKrConfig(**kwargs).to_dict()
    base = tiny_llama()
    ours = get_peft_model(base, LoKrConfig(**kwargs))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoKrConfig(**kwargs))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    share(theirs, ours)
    with torch.no_grad():
        torch.testing.assert_close(run(ours.eval(), IDS), run(theirs.eval(), IDS))
