"""The BLT entropy model's cache: a second preparation with the same training (bytes, settings,
seed) loads the weights the first one trained instead of training again, with the same facts and
FLOPs charged; a damaged entry is trained again; another seed is another entry."""

import pytest
import torch

from harness.api import registry
from harness.run import data
from tests.conftest import SMALL_CONFIGS, context

TEXT = data.embedded_corpus("pydoc-topics", 24000)
CONFIG = SMALL_CONFIGS["patcher"] | {"patcher": "entropy"}


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))


def prepared(seed: int = 0):
    torch.manual_seed(seed)
    model = registry.build("patcher", CONFIG)
    facts = model.prepare(TEXT, context(64, seed=seed)).facts
    return model, facts


def test_a_second_preparation_loads_the_trained_entropy_model(capsys):
    first, trained = prepared()
    second, loaded = prepared()
    assert not trained["entropy_model"]["cache_hit"] and loaded["entropy_model"]["cache_hit"]
    same = {k: v for k, v in trained["entropy_model"].items() if k != "cache_hit"}
    assert {k: v for k, v in loaded["entropy_model"].items() if k != "cache_hit"} == same  # steps, FLOPs, held-out bpb
    for (name, a), (_, b) in zip(first.entropy_model.state_dict().items(), second.entropy_model.state_dict().items()):
        assert torch.equal(a, b), name
    assert float(first.theta) == float(second.theta) and first.start_rate == second.start_rate
    assert not any(p.requires_grad for p in second.entropy_model.parameters()) and not second.entropy_model.training

    cache = trained["entropy_model"]["cache_file"]
    with open(cache, "r+b") as f:  # damage the entry: it is trained again, to the same weights
        f.seek(200)
        f.write(b"x" * 64)
    third, again = prepared()
    assert "rebuilding it" in capsys.readouterr().err and not again["entropy_model"]["cache_hit"]
    for a, b in zip(first.entropy_model.state_dict().values(), third.entropy_model.state_dict().values()):
        assert torch.equal(a, b)

    _, other_seed = prepared(seed=1)
    assert not other_seed["entropy_model"]["cache_hit"] and other_seed["entropy_model"]["cache_file"] != cache
