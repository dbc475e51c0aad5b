"""Loading and paths: weights are never unpickled, and no parameter can address a path outside
the stores."""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smlrec.errors import IntegrityError, SmlrecError
from smlrec.io import load_bundle, save_bundle, sha256_bytes
from smlrec.registry import StateStore, check_period_id
from smlrec.vocab import Vocab

ROOT = Path(__file__).resolve().parents[1]
CODE = ["smlrec", "components", "pipelines", "serving"]
HOSTILE_IDS = ["../../etc", "../x", "a/b", "2024-01-01/../../x", "/etc/passwd", "..",
               "2024-1-1", "2024-01-01\x00", " 2024-01-01", "2024-01-01/", "~root"]


def test_no_code_path_unpickles() -> None:
    """Weights are safetensors; JSON for everything else. No pickle-based loader anywhere."""
    pattern = re.compile(r"\bpickle\b|torch\.load\(|joblib|cloudpickle|\bdill\b|"
                         r"allow_pickle\s*=\s*True|\.load_state_dict\(torch\.load")
    offenders = []
    for package in CODE:
        for path in (ROOT / package).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, offenders


class _Payload:
    def __reduce__(self):  # what a malicious "weights" file would run if unpickled
        return (Path.touch, (Path(__file__).parent / "PWNED",))


def test_a_pickle_posing_as_weights_is_refused_without_running_it(tmp_path: Path) -> None:
    """An attacker who controls the bundle (weights and manifest) still cannot run code."""
    url = str(tmp_path / "bundle")
    save_bundle(url, {"user": torch.zeros(2, 2)}, {"period": "2024-01-01"},
                {"vocab_users.json": Vocab(["a", "b"]).to_json().encode()})
    evil = pickle.dumps(_Payload())
    (tmp_path / "bundle/weights.safetensors").write_bytes(evil)
    manifest = json.loads((tmp_path / "bundle/manifest.json").read_text())
    manifest["files"]["weights.safetensors"] = sha256_bytes(evil)  # checksums match too
    (tmp_path / "bundle/manifest.json").write_text(json.dumps(manifest))
    marker = Path(__file__).parent / "PWNED"
    with pytest.raises(Exception) as err:
        load_bundle(url)
    assert not marker.exists(), "the pickle ran"
    assert not isinstance(err.value, (AttributeError, TypeError)), err.value


@pytest.mark.parametrize("bad", HOSTILE_IDS)
def test_hostile_period_ids_are_refused_everywhere(tmp_path: Path, bad: str) -> None:
    with pytest.raises(SmlrecError, match="invalid period id"):
        check_period_id(bad)
    store = StateStore(str(tmp_path / "state"))
    with pytest.raises(SmlrecError, match="invalid period id"):
        store.period_uri(bad)
    with pytest.raises(SmlrecError):
        store.has_period(bad)


def test_hostile_period_id_in_the_pipeline_steps_and_cli(tmp_path: Path) -> None:
    from kfp import dsl

    from components import ops

    for op in (ops.resolve_period_op,):
        with pytest.raises(SmlrecError, match="invalid period id"):
            op.python_func(period="../../etc", scheduled_time="", period_spec="1D")
    with pytest.raises(SmlrecError, match="invalid period id"):
        ops.validate_op.python_func(period="../../etc", data_uri=str(tmp_path), input_file="",
                                    period_spec="1D", min_rows=1, max_rows=10,
                                    report=dsl.Markdown(name="r", uri=str(tmp_path / "r.md")))
    cli = [sys.executable, "-m", "pipelines.entry", "pipeline", "run", "--period", "../../etc",
           "--data-uri", str(tmp_path / "d"), "--state-uri", str(tmp_path / "s")]
    r = subprocess.run(cli, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "invalid period id '../../etc'" in r.stderr
    assert not (tmp_path / "s").exists() and not (tmp_path / "etc").exists()


def test_a_pointer_naming_a_path_outside_the_store_is_never_served(tmp_path: Path) -> None:
    """A tampered pointer file cannot make the service load a bundle from elsewhere."""
    from serving.sources import LiveModels, StateStoreSource

    store = StateStore(str(tmp_path / "state"))
    (tmp_path / "state/pointers").mkdir(parents=True)
    (tmp_path / "state/pointers/production.json").write_text(
        json.dumps({"period": "../../outside"}))
    live = LiveModels(StateStoreSource(store.uri), torch.device("cpu"), reload_seconds=0)
    assert live.refresh() == {}
    assert live.production is None and "invalid period id" in live.last_error


def test_corrupt_packaged_model_is_not_served(tmp_path: Path) -> None:
    from serving.model import ModelInfo, ServedModel

    url = str(tmp_path / "bundle")
    save_bundle(url, {"user": torch.zeros(2, 2), "item": torch.zeros(3, 2)}, {},
                {"vocab_users.json": Vocab(["a", "b"]).to_json().encode(),
                 "vocab_items.json": Vocab(["x", "y", "z"]).to_json().encode()})
    (tmp_path / "bundle/vocab_items.json").write_text('{"ids": ["x", "../../y", "z"]}')
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        ServedModel.from_bundle(url, ModelInfo("production", "v", ""))
