"""The prediction API: a real ``bentoml serve`` process on 127.0.0.1, called over HTTP.

One server for the module, started on models packaged from a temporary state store into a
temporary BentoML home, with a real Feast online store (SQLite) on disk. Each test states what
it expects of the HTTP contract; the model-level checks compare with top-k computed here
from the packaged tensors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from benchmarks.serving import Server as BentoServer
from serving.model import canary_bucket
from smlrec.registry import StateStore
from smlrec.schema import ITEM, PERIOD, TS, USER
from smlrec.vocab import Vocab

bentoml = pytest.importorskip("bentoml")
httpx = pytest.importorskip("httpx")

ROOT = Path(__file__).resolve().parents[1]
N_USERS, N_ITEMS, DIM = 60, 300, 16
SHARE = 0.3
USERS = [f"u{i}" for i in range(N_USERS)]
ITEMS = [f"i{i}" for i in range(N_ITEMS)]
P1, P2, P3 = "2024-01-01", "2024-01-08", "2024-01-15"
FEAST_USER = "f1"  # unknown to the model, known to the Feast online store
FEAST_RECENT = ["i7", "i6", "i5"]


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w.user": torch.randn(N_USERS, DIM, generator=g),
            "w.item": torch.randn(N_ITEMS, DIM, generator=g)}


def _interactions() -> pd.DataFrame:
    """Period P1: item i<k> is interacted with by (30 - k) users for k < 30; plus FEAST_USER."""
    rows = []
    t0 = pd.Timestamp(P1, tz="UTC")
    for k in range(30):
        for j in range(30 - k):
            rows.append((USERS[j], ITEMS[k], t0 + pd.Timedelta(minutes=k * 31 + j)))
    for n, item in enumerate(reversed(FEAST_RECENT)):  # newest last in time
        rows.append((FEAST_USER, item, t0 + pd.Timedelta(days=2, minutes=n)))
    df = pd.DataFrame(rows, columns=[USER, ITEM, TS])
    df[PERIOD] = P1
    return df


class Server:
    """A ``bentoml serve`` subprocess and what it was started on."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.state = StateStore(str(tmp / "state"))
        self.data = str(tmp / "data")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FEAST_")}
        self.env.update(BENTOML_HOME=str(tmp / "bento"), BENTOML_DO_NOT_TRACK="true",
                        SMLREC_CANARY_SHARE=str(SHARE), SMLREC_RELOAD_SECONDS="0.5",
                        SMLREC_FEATURE_REPO=str(ROOT / "feature_repo"),
                        SMLREC_FEATURE_DATA=str(tmp / "features"), SMLREC_THREADS="1",
                        SMLREC_DEVICE="cpu", PYTHONPATH=str(ROOT))
        self.log = tmp / "serve.log"
        self.bento: BentoServer | None = None
        self.url = ""

    def package(self, stage: str, period: str, seed: int) -> str:
        """Save a bundle for ``period``, point ``stage`` at it, package it (in a child process,
        as the pipeline's package step runs, with this server's BENTOML_HOME)."""
        self.state.save_period(period, _tensors(seed), {}, Vocab(USERS), Vocab(ITEMS))
        self.state.set_pointer(stage, period)
        code = ("import sys; from components.packaging import package; "
                "print(package(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]))")
        out = subprocess.run([sys.executable, "-c", code, self.state.uri, stage, P1, self.data],
                             env=self.env, cwd=ROOT, capture_output=True, text=True, check=True)
        return out.stdout.strip().splitlines()[-1]

    def start(self) -> None:
        """``bentoml serve`` with this environment (the benchmark's launcher: a free port,
        ready when /readyz answers 200, stopped with SIGTERM then SIGKILL)."""
        self.bento = BentoServer(Path(self.env["BENTOML_HOME"]), workers=1,
                                 log_path=self.log, env=self.env)
        self.url = self.bento.url
        self.bento.start(timeout=90)

    def tail(self, n: int = 40) -> str:
        return self.bento.log_tail(n) if self.bento else ""

    def stop(self) -> None:
        if self.bento is not None:
            self.bento.stop()

    def post(self, route: str, body: object, raw: bool = False) -> httpx.Response:
        content = body if raw else json.dumps(body)
        return httpx.post(f"{self.url}{route}", content=content, timeout=30,
                          headers={"content-type": "application/json"})


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from adapters.feast_store import FeatureStoreAdapter
    from smlrec.data.store import write_interactions

    tmp = tmp_path_factory.mktemp("serving")
    srv = Server(tmp)
    df = _interactions()
    write_interactions(df, srv.data)
    feast = FeatureStoreAdapter(ROOT / "feature_repo", tmp / "features", env={})
    feast.write_period(P1, df, pd.Timestamp(P2, tz="UTC"))
    feast.apply()
    feast.materialize(pd.Timestamp(P2, tz="UTC"))
    srv.package("production", P1, seed=1)
    srv.package("candidate", P2, seed=2)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[bentoml.SyncHTTPClient]:
    with bentoml.SyncHTTPClient(server.url, timeout=30) as c:
        yield c


def _expected(server: Server, period: str, query: torch.Tensor, k: int,
              exclude: set[str] = frozenset()) -> list[str]:
    """The model's own top-k: scores over every item from the state store's tensors."""
    tensors, *_ = server.state.load_period(period)
    scores = tensors["w.item"] @ query
    for item in exclude:
        scores[ITEMS.index(item)] = float("-inf")
    return [ITEMS[i] for i in torch.topk(scores, k).indices.tolist()]


def _stage(user_id: str) -> str:
    return "candidate" if canary_bucket(user_id) < SHARE else "production"


def _period(stage: str) -> str:
    return {"production": P1, "candidate": P2}[stage]


def test_health_readiness_and_metadata(server: Server, client) -> None:
    assert httpx.get(f"{server.url}/livez").status_code == 200
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    meta = client.metadata()
    assert meta["production"]["period"] == P1 and meta["candidate"]["period"] == P2
    assert meta["production"]["version"].startswith("smlrec-mf:")
    assert meta["production"]["n_items"] == N_ITEMS and meta["production"]["dim"] == DIM
    assert meta["canary_share"] == SHARE and meta["device"] == "cpu"
    assert meta["features"]["online_store"] is True, meta["features"]
    assert "recent_items:recent_items" in meta["features"]["used"]
    schema = httpx.get(f"{server.url}/docs.json").json()
    for route in ("/recommend", "/score", "/similar_items", "/metadata"):
        assert route in schema["paths"], route
    for stamp in (meta["last_check"], meta["production"]["loaded_at"]):
        assert datetime.fromisoformat(stamp.replace("Z", "+00:00")).tzinfo is not None, stamp
    assert meta["candidate"]["gate"]["note"].startswith("not gated yet"), meta["candidate"]


def test_docs_page_is_offline_titled_and_documents_every_status(server: Server) -> None:
    for path in ("/docs", "/"):
        page = httpx.get(f"{server.url}{path}")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "smlrec" in page.text and "/docs.json" in page.text
        assert "http://" not in page.text and "https://" not in page.text, path
        for asset in ("/static_content/swagger-ui-bundle.js", "/static_content/swagger-ui.css"):
            assert asset in page.text and httpx.get(f"{server.url}{asset}").status_code == 200
    spec = httpx.get(f"{server.url}/docs.json").json()
    assert spec["info"]["title"] == "smlrec prediction API"
    assert spec["info"]["version"] not in ("", "None") and "bentoml" not in json.dumps(
        spec["info"]).lower()
    answers = {"/recommend": {"400", "413"}, "/score": {"400", "404", "413", "503"},
               "/similar_items": {"400", "404", "413", "503"}}
    for route, codes in answers.items():
        post = spec["paths"][route]["post"]
        assert set(post["responses"]) == {"200"} | codes, (route, list(post["responses"]))
        for code in codes:
            example = post["responses"][code]["content"]["application/json"]["example"]
            assert isinstance(example["error"], str)
        body = post["requestBody"]["content"]["application/json"]
        assert body["example"] and set(body["example"]) <= set(body["schema"]["properties"])
    example = spec["paths"]["/recommend"]["post"]["requestBody"]["content"][
        "application/json"]["example"]
    assert server.post("/recommend", example).status_code == 200  # the example works


FIELD_ERRORS = [({"k": 5}, "user_id", "user_id is required (or users, a list)"),
                ({"user_id": "u1", "users": [{"user_id": "u2"}]}, "users",
                 "users cannot come with user_id: send one user or a list"),
                ({"user_id": "u1", "k": 0}, "k", "k: input should be greater than or equal to 1"),
                ({"user_id": "u1", "recent_items": ["i1", 2]}, "recent_items[1]",
                 "recent_items[1]: input should be a valid string"),
                ({"user_id": "u1", "colour": "red"}, "colour",
                 "colour is not a field of this request")]


def test_a_400_names_the_field_and_is_logged_as_one_warning_line(server: Server) -> None:
    for body, field, sentence in FIELD_ERRORS:
        r = server.post("/recommend", body)
        assert r.status_code == 400, r.text
        payload = r.json()
        assert payload["field"] == field and payload["error"] == sentence, payload
        assert payload["detail"][0]["loc"] and "url" not in payload["detail"][0]
    r = server.post("/recommend", b'{"user_id": ', raw=True)
    assert r.json()["error"].startswith("the body is not valid JSON"), r.text
    deadline = time.monotonic() + 10
    while "recent_items[1]: input should be" not in server.tail(400):
        assert time.monotonic() < deadline, server.tail(40)
        time.sleep(0.2)
    log = server.tail(400)
    assert "client error on /recommend: user_id is required (or users, a list) (answered 400)" \
        in log
    assert "[WARNING]" in log and "Exception on /recommend" not in log
    assert "ValidationError" not in log, log[-2000:]


def test_recommendations_match_the_models_own_top_k(server: Server, client) -> None:
    for user in USERS[:25]:
        got = client.recommend(user_id=user, k=10, exclude_seen=False)
        stage = _stage(user)
        assert got["model"]["stage"] == stage and got["path"] == "user"
        assert got["fallback"] is False and got["model"]["period"] == _period(stage)
        tensors, *_ = server.state.load_period(_period(stage))
        query = tensors["w.user"][USERS.index(user)]
        assert got["items"] == _expected(server, _period(stage), query, 10)
        assert got["scores"] == sorted(got["scores"], reverse=True)


def test_exclude_seen_leaves_out_recent_and_feast_items(server: Server, client) -> None:
    user = next(u for u in USERS if _stage(u) == "production")
    tensors, *_ = server.state.load_period(P1)
    query = tensors["w.user"][USERS.index(user)]
    top = _expected(server, P1, query, 5)
    got = client.recommend(user_id=user, k=5, exclude_seen=True, recent_items=top[:2])
    seen = set(top[:2])
    assert not seen & set(got["items"])
    assert got["items"] == _expected(server, P1, query, 5, exclude=seen)


def test_unknown_user_with_recent_items_uses_their_mean_embedding(server: Server,
                                                                  client) -> None:
    user = next(f"new{i}" for i in range(1000) if _stage(f"new{i}") == "production")
    recent = ["i3", "i10", "not-an-item"]
    got = client.recommend(user_id=user, k=8, exclude_seen=False, recent_items=recent)
    assert got["path"] == "recent_items" and got["fallback"] is True
    assert got["ignored_items"] == ["not-an-item"]
    tensors, *_ = server.state.load_period(P1)
    query = tensors["w.item"][[3, 10]].mean(dim=0)
    assert got["items"] == _expected(server, P1, query, 8)


def test_unknown_user_known_to_feast_uses_online_recent_items(server: Server, client) -> None:
    got = client.recommend(user_id=FEAST_USER, k=6, exclude_seen=True)
    stage = _stage(FEAST_USER)
    assert got["path"] == "feast_recent_items" and got["model"]["stage"] == stage
    tensors, *_ = server.state.load_period(_period(stage))
    query = tensors["w.item"][[ITEMS.index(i) for i in FEAST_RECENT]].mean(dim=0)
    assert got["items"] == _expected(server, _period(stage), query, 6, set(FEAST_RECENT))


def test_nothing_known_gives_popular_items_from_feast(server: Server, client) -> None:
    got = client.recommend(user_id="nobody-knows-me", k=5, exclude_seen=True,
                           recent_items=["unknown-a", "unknown-b"])
    assert got["path"] == "popular" and got["fallback"] is True
    assert got["items"] == ["i0", "i1", "i2", "i3", "i4"]  # by interaction count in P1
    got = client.recommend(user_id="nobody-knows-me", k=3, exclude_seen=True,
                           recent_items=["i0"])  # i0 is known: the recent-items path
    assert got["path"] == "recent_items"


def test_a_users_body_answers_each_user_as_a_one_user_body_would(server: Server) -> None:
    """Known users of both stages, a new user with recent items, one known to Feast and one
    nobody knows, in one body: each answer equals the one-user answer, in the body's order."""
    entries = [{"user_id": u} for u in USERS[:12]] + [
        {"user_id": "new-batch", "recent_items": ["i3", "i10", "not-an-item"]},
        {"user_id": FEAST_USER}, {"user_id": "nobody-knows-me"}, {"user_id": USERS[0]}]
    r = server.post("/recommend", {"users": entries, "k": 7, "exclude_seen": True})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [a["user_id"] for a in results] == [e["user_id"] for e in entries]
    for entry, got in zip(entries, results, strict=True):
        one = server.post("/recommend", {**entry, "k": 7, "exclude_seen": True}).json()
        # The same answer; scores to float rounding (one product for many rows sums in
        # another order than one for a single row).
        np.testing.assert_allclose(got.pop("scores"), one.pop("scores"), rtol=1e-5)
        assert got == one, entry
    assert {a["path"] for a in results} >= {"user", "recent_items", "feast_recent_items",
                                              "popular"}
    assert {a["model"]["stage"] for a in results} == {"production", "candidate"}


def test_score_and_similar_items(server: Server, client) -> None:
    user = next(u for u in USERS if _stage(u) == "production")
    got = client.score(user_id=user, item_ids=["i1", "i2", "i1"])
    tensors, *_ = server.state.load_period(P1)
    want = (tensors["w.item"][[1, 2, 1]] @ tensors["w.user"][USERS.index(user)]).tolist()
    np.testing.assert_allclose(got["scores"], want, rtol=1e-5)
    assert got["item_ids"] == ["i1", "i2", "i1"] and got["path"] == "user"
    similar = client.similar_items(item_id="i9", k=4)
    item = tensors["w.item"]
    cos = torch.nn.functional.cosine_similarity(item, item[9].unsqueeze(0), dim=1)
    cos[9] = float("-inf")
    assert similar["items"] == [ITEMS[i] for i in torch.topk(cos, 4).indices.tolist()]
    assert "i9" not in similar["items"]


def test_canary_split_is_stable_and_close_to_the_share(server: Server) -> None:
    n = 800
    stages: Counter[str] = Counter()
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for i in range(n):
            user = f"canary-{i}"
            body = {"user_id": user, "k": 1, "exclude_seen": False, "recent_items": ["i1"]}
            stage = http.post("/recommend", json=body).json()["model"]["stage"]
            assert stage == _stage(user)  # the same stable hash as the server's
            stages[stage] += 1
        again = http.post("/recommend", json={"user_id": "canary-7", "k": 1,
                                              "recent_items": ["i1"]}).json()
    assert again["model"]["stage"] == _stage("canary-7")
    share = stages["candidate"] / n
    sigma = (SHARE * (1 - SHARE) / n) ** 0.5
    assert abs(share - SHARE) < 4 * sigma, stages


BAD = [
    ("/recommend", b'{"user_id": "u1", "k": ', "malformed JSON"),
    ("/recommend", b"not json at all", "not JSON"),
    ("/recommend", b"[1, 2, 3]", "a list, not an object"),
    ("/recommend", b"", "empty body"),
    ("/recommend", {"k": 5}, "user_id missing"),
    ("/recommend", {"user_id": 17, "k": 5}, "user_id not a string"),
    ("/recommend", {"user_id": None}, "user_id null"),
    ("/recommend", {"user_id": ""}, "empty user_id"),
    ("/recommend", {"user_id": "u" * 300}, "user_id too long"),
    ("/recommend", {"user_id": "u1", "k": "10"}, "k a string"),
    ("/recommend", {"user_id": "u1", "k": 2.5}, "k a float"),
    ("/recommend", {"user_id": "u1", "k": 0}, "k zero"),
    ("/recommend", {"user_id": "u1", "k": -5}, "k negative"),
    ("/recommend", {"user_id": "u1", "k": 10**12}, "k huge"),
    ("/recommend", {"user_id": "u1", "exclude_seen": "yes"}, "flag not a boolean"),
    ("/recommend", {"user_id": "u1", "recent_items": "i1"}, "recent_items not a list"),
    ("/recommend", {"user_id": "u1", "recent_items": [1, 2]}, "recent_items not strings"),
    ("/recommend", {"user_id": "u1", "recent_items": ["i1"] * 1001}, "recent_items too long"),
    ("/recommend", {"user_id": "u1", "colour": "red"}, "unknown field"),
    ("/recommend", {"users": []}, "users empty"),
    ("/recommend", {"users": ["u1"]}, "users entry not an object"),
    ("/recommend", {"users": [{"user_id": "u1"}], "user_id": "u1"}, "user_id beside users"),
    ("/recommend", {"users": [{"user_id": "u1"}], "recent_items": ["i1"]},
     "recent_items beside users"),
    ("/recommend", {"users": [{"user_id": "u1", "k": 3}]}, "unknown field in a users entry"),
    ("/recommend", {"users": [{"user_id": f"u{i}"} for i in range(1001)]}, "users too many"),
    ("/score", {"user_id": "u1", "item_ids": []}, "empty item list"),
    ("/score", {"user_id": "u1", "item_ids": ["i1", "nope", "nada"]}, "unknown item ids"),
    ("/score", {"user_id": "u1", "item_ids": ["i1"] * 1001}, "item list too long"),
    ("/score", {"user_id": "stranger", "item_ids": ["i1"]}, "unknown user, nothing known"),
    ("/score", {"user_id": "u1"}, "item_ids missing"),
    ("/similar_items", {"item_id": "nope"}, "unknown item"),
    ("/similar_items", {"item_id": "i1", "k": -1}, "k negative"),
    ("/similar_items", {"item_id": ["i1"]}, "item_id a list"),
]


@pytest.mark.parametrize(("route", "body", "why"), BAD, ids=[b[2] for b in BAD])
def test_bad_input_gets_4xx_with_a_message(server: Server, route: str, body: object,
                                           why: str) -> None:
    raw = isinstance(body, bytes)
    r = server.post(route, body, raw=raw)
    assert 400 <= r.status_code < 500, (why, r.status_code, r.text)
    payload = r.json()
    assert isinstance(payload, dict) and payload.get("error"), (why, r.text)
    if why == "unknown item ids":
        assert r.status_code == 404 and payload["unknown_item_ids"] == ["nope", "nada"]
        assert "'nope'" in payload["error"]


def test_request_bodies_over_the_limit_get_413(server: Server) -> None:
    big = json.dumps({"user_id": "u1", "recent_items": ["i1"] * 400_000})  # about 2.4 MB
    r = server.post("/recommend", big, raw=True)
    assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]

    def chunks():  # no Content-Length: the limit is counted as the body streams in
        for _ in range(40):
            yield b" " * 65536

    r = httpx.post(f"{server.url}/score", content=chunks(), timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert httpx.post(f"{server.url}/recommend", json={"user_id": "u1"}).status_code == 200


def test_fuzz_every_endpoint_from_its_openapi_spec(server: Server, reliability) -> None:
    """Property-based fuzzing (schemathesis + hypothesis) of every operation in the
    service's own OpenAPI document, with valid and invalid inputs, plus arbitrary bytes as
    bodies: never a 5xx, never a hang (10 s timeout per call)."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from hypothesis.errors import Unsatisfiable

    schema = schemathesis.openapi.from_url(f"{server.url}/docs.json")
    five_xx: list[str] = []
    reliability.add("fuzz_5xx", 0)
    config = settings(max_examples=50, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {"POST /recommend", "POST /score", "POST /similar_items"} <= {
        op.label for op in operations}

    def fuzz_operation(op, mode) -> None:
        @config
        @given(case=op.as_strategy(generation_mode=mode))
        def fuzz(case) -> None:
            response = case.call(timeout=10)
            reliability.add("fuzz_cases")
            if response.status_code >= 500:
                reliability.add("fuzz_5xx")
                five_xx.append(f"{op.label} {case.body!r} -> {response.status_code}")

        try:
            fuzz()
        except Unsatisfiable:  # an operation without inputs has no invalid input to send
            assert mode == schemathesis.GenerationMode.NEGATIVE, op.label

    def fuzz_bytes(route: str) -> None:
        @config
        @given(body=st.binary(max_size=2048))
        def raw(body: bytes) -> None:
            status = server.post(route, body, raw=True).status_code
            reliability.add("fuzz_cases")
            if status >= 500:
                reliability.add("fuzz_5xx")
                five_xx.append(f"{route} {body!r} -> {status}")

        raw()

    for op in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            fuzz_operation(op, mode)
    for route in ("/recommend", "/score", "/similar_items", "/metadata"):
        fuzz_bytes(route)
    assert not five_xx, five_xx[:10]


def test_hot_swap_under_concurrent_requests_without_errors(server: Server) -> None:
    """Promote and package a new production model while 6 threads send requests: every
    request answers 200, each thread sees the old version then the new one, never back."""
    user = next(u for u in USERS if _stage(u) == "production")
    old = httpx.post(f"{server.url}/metadata", json={}).json()["production"]["version"]
    stop = threading.Event()
    seen: list[list[str]] = [[] for _ in range(6)]
    errors: list[str] = []

    def hammer(i: int) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            while not stop.is_set():
                try:
                    r = http.post("/recommend", json={"user_id": user, "k": 10,
                                                      "exclude_seen": False})
                except httpx.HTTPError as exc:
                    errors.append(repr(exc))
                    continue
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:200]}")
                    continue
                version = r.json()["model"]["version"]
                if not seen[i] or seen[i][-1] != version:
                    seen[i].append(version)

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        new = server.package("production", P3, seed=3)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(s and s[-1] == new for s in seen):
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors[:5]
    assert new != old
    for versions in seen:
        assert versions == [old, new], seen
    got = httpx.post(f"{server.url}/recommend",
                     json={"user_id": user, "k": 10, "exclude_seen": False}).json()
    tensors, *_ = server.state.load_period(P3)
    assert got["model"]["period"] == P3
    assert got["items"] == _expected(server, P3, tensors["w.user"][USERS.index(user)], 10)
    meta = httpx.post(f"{server.url}/metadata", json={}).json()
    assert meta["swaps"] >= 3 and meta["last_error"] == ""
    assert meta["batching"]["largest_batch"] > 1  # concurrent requests shared a product


def test_bento_builds_offline_with_the_pinned_requirements(server: Server) -> None:
    """`make bento`: the requirements come from pyproject.toml, the build needs no network,
    and the Bento references the production model being served."""
    from serving.requirements import serving_requirements

    reqs = ROOT / "build/requirements-serving.txt"  # what `make bento` writes (ignored by git)
    subprocess.run([sys.executable, "-m", "serving.requirements", str(reqs)], cwd=ROOT,
                   env=server.env, check=True, capture_output=True)
    lines = reqs.read_text().splitlines()
    assert lines == serving_requirements() and "torch==2.13.0" in lines
    assert any(line.startswith("bentoml==") for line in lines)
    bentofile = ROOT / "serving/bentofile.yaml"
    bentoml_cli = Path(sys.executable).parent / "bentoml"
    out = subprocess.run([str(bentoml_cli), "build", "-f", str(bentofile), "--output", "tag",
                          str(ROOT)], cwd=ROOT, env=server.env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    tag = out.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    bento = Path(server.env["BENTOML_HOME"]) / "bentos" / Path(*tag.split(":"))
    info = (bento / "bento.yaml").read_text()
    production = httpx.post(f"{server.url}/metadata", json={}).json()["production"]["version"]
    assert f"tag: {production}" in info  # BentoModel("smlrec-mf:latest"), the newest
    assert (bento / "src/serving/service.py").is_file()
    assert (bento / "src/smlrec/data/store.py").is_file()
    assert "torch==2.13.0" in (bento / "env/python/requirements.txt").read_text()


def test_popularity_mode_before_any_model_is_accepted(tmp_path: Path) -> None:
    """Only a candidate exists (the gate accepted nothing yet) and no feature store: users
    outside the canary get the packaged popular items, canary users the candidate."""
    from smlrec.data.store import write_interactions

    srv = Server(tmp_path)
    for key in ("SMLREC_FEATURE_REPO", "SMLREC_FEATURE_DATA"):
        srv.env.pop(key)
    write_interactions(_interactions(), srv.data)
    srv.state.append_decision({"period": P2, "candidate": P1, "decision": "reject",
                               "best": "sml", "reasons": ["sml: ndcg@20 0.1 does not beat "
                                                          "popularity 0.2"]})
    srv.package("candidate", P2, seed=2)
    srv.start()
    try:
        with bentoml.SyncHTTPClient(srv.url, timeout=30) as c:
            meta = c.metadata()
            assert meta["mode"] == "popularity"
            assert meta["last_decision"]["decision"] == "reject"
            assert "does not beat popularity" in meta["why_popularity"], meta["why_popularity"]
            outside = next(u for u in USERS if _stage(u) == "production")
            got = c.recommend(user_id=outside, k=3, recent_items=["i7", "nope"])
            assert got["model"]["stage"] == "popularity" and got["path"] == "popular"
            assert got["items"] == ["i0", "i1", "i2"]
            assert got["ignored_items"] == ["i7", "nope"]  # no model: none of them was used
            inside = next(u for u in USERS if _stage(u) == "candidate")
            got = c.recommend(user_id=inside, k=3, exclude_seen=False)
            assert got["model"]["stage"] == "candidate" and got["path"] == "user"
        r = srv.post("/similar_items", {"item_id": "i1"})
        assert r.status_code == 503 and "no model has been accepted" in r.json()["error"]
    finally:
        srv.stop()
