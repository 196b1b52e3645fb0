"""The config is resolved once into a Pipeline that every consumer reads."""

import pytest
import torch

from pactmerge.config import load_config
from pactmerge.errors import PactMergeError
from pactmerge.pipeline import resolve_pipeline


def _cfg(**kw):
    sd = {"w": torch.zeros(4, 4)}
    return load_config({"base_model": sd, "models": [sd, sd], **kw})


def test_pipeline_orders_pre_method_post_and_keeps_the_configured_order():
    cfg = _cfg(method="ties", filters=[{"csp": {"rank": 2}}, "dare", {"pact": {"K": 3, "k": 1}}])
    p = cfg.pipeline
    assert [s.name for s in p.filters] == ["csp", "dare", "pact"]
    assert [s.name for s in p.pre] == ["dare", "pact"]
    assert [s.name for s in p.post] == ["csp"]
    assert p.describe() == "dare -> pact -> ties -> csp"
    assert p.first("pact").params.K == 3 and p.first("pact").where == "filters[2].pact"
    assert [s.name for s in p.pre_before("pact")] == ["dare"]
    assert p.method.params.density == 0.2


def test_a_pact_block_alone_is_the_pact_filter_and_a_bare_pact_entry_uses_it():
    assert [s.name for s in _cfg(pact={"K": 2, "k": 1}).pipeline.filters] == ["pact"]
    p = _cfg(pact={"K": 2, "k": 1}, filters=["dare", "pact"]).pipeline
    assert p.first("pact").params.K == 2 and p.first("pact").where == "pact"


def test_a_pact_block_that_no_filter_uses_is_refused_not_ignored():
    with pytest.raises(PactMergeError, match="config key 'pact'"):
        _cfg(pact={"K": 2, "k": 1}, filters=["dare"])


def test_bad_options_name_the_config_key():
    with pytest.raises(PactMergeError, match=r"config key 'filters\[0\]\.dare\.q' \(dare\): unknown key"):
        _cfg(filters=[{"dare": {"q": 1}}])
    with pytest.raises(PactMergeError, match=r"config key 'parameters\.density' \(ties\)"):
        _cfg(method="ties", parameters={"density": 2.0})
    with pytest.raises(PactMergeError, match="expected a mapping"):
        resolve_pipeline("ties", {}, [{"dare": [1, 2]}], None)


def test_the_pipeline_is_resolved_once_per_config(monkeypatch):
    import pactmerge.config.schema as schema

    cfg = _cfg(pact={"K": 2, "k": 1})
    calls = []
    monkeypatch.setattr(schema, "resolve_pipeline", lambda *a: calls.append(a))
    assert cfg.pipeline is cfg.pipeline and calls == []
