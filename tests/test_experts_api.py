"""Expert libraries over HTTP (issue 12): the `adapters` mixture and `route` request fields on a
real server (tiny random Llama, two tenants, four shared adapters and one tenant's own), from the
openai client's extra_body and raw httpx: validation (every 400 names its field), visibility (a
foreign expert answers as an unknown one), limits, quotas, listings, metrics, and mixtures and
routes sharing batches with single-adapter and base requests.

The numerics of mixtures and routing are checked against PEFT in tests/test_experts_parity.py;
here only identities that hold for any correct implementation: a mixture of one adapter at
weight 1, or a route over one expert, is that adapter alone.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from peft_adapters import make_peft_adapter
from server.tenants import hash_key
from server_process import ServerProcess

BASE = "tiny"
KEYS = {"acme": "key-acme", "globex": "key-globex"}
QV = dict(target_modules=["q_proj", "v_proj"])
SHARED = ("a", "b", "c", "d")
PROMPT = [5, 6, 7, 8, 9]  # token ids: exactly 5 prompt tokens


@pytest.fixture(scope="module")
def made(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("made")
    out = {n: make_peft_adapter(tiny_llama_dir, root / n, seed=40 + i, r=4, lora_alpha=8, **QV)
           for i, n in enumerate((*SHARED, "mine"))}
    out["dora"] = make_peft_adapter(tiny_llama_dir, root / "dora", seed=50, r=4, lora_alpha=8, use_dora=True, **QV)
    return out


@pytest.fixture(scope="module")
def server(tiny_llama_dir, made, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    store = work / "store"
    store.mkdir()
    for name in (*SHARED, "dora"):
        shutil.copytree(made[name], store / name)
    tenants = work / "tenants.toml"
    tenants.write_text(f"""
[tenants.acme]
keys = ["{hash_key(KEYS['acme'])}"]
[tenants.globex]
keys = ["{hash_key(KEYS['globex'])}"]
tokens_per_minute = 200
""")
    srv = ServerProcess(["--model", str(tiny_llama_dir), "--served-model-name", BASE, "--dtype", "float32",
                         "--kv-cache-memory", "8MiB", "--num-threads", "1", "--adapters-dir", str(store),
                         "--max-lora-rank", "16", "--max-loras", "4", "--max-mixture-experts", "5",
                         "--max-mixture-rank", "40", "--max-route-experts", "4", "--tenants", str(tenants)],
                        work / "server.log")
    try:
        r = httpx.post(srv.base_url + "/v1/adapters", headers=auth("acme"), data={"name": "mine"}, timeout=60,
                       files={f: (f, (made["mine"] / f).read_bytes(), "application/octet-stream")
                              for f in ("adapter_config.json", "adapter_model.safetensors")})
        assert r.status_code == 200, r.text
        yield srv
    finally:
        srv.stop()


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def client(server, tenant: str = "acme") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEYS[tenant], max_retries=0, timeout=120)


def post(server, body: dict, tenant: str = "acme", path: str = "/v1/completions") -> httpx.Response:
    return httpx.post(server.base_url + path, headers={**auth(tenant), "Content-Type": "application/json"},
                      timeout=120,
                      content=json.dumps(body))  # json.dumps writes Infinity, as some clients do


def completion(server, tenant: str = "acme", max_tokens: int = 6, **extra) -> str:
    """The greedy completion text of PROMPT (`extra`: extra_body fields; `model`: default the base)."""
    r = client(server, tenant).completions.create(model=extra.pop("model", BASE), prompt=PROMPT,
                                                   max_tokens=max_tokens, temperature=0,
                                                   extra_body={"ignore_eos": True, **extra})
    assert r.usage.completion_tokens == max_tokens
    return r.choices[0].text


def error(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


# --- validation: 400s naming the field ---------------------------------------------------------

MIX = [{"id": "a", "weight": 0.7}, {"id": "b", "weight": 0.3}]

BAD = [  # (extra fields, expected param, expected code or None)
    ({"adapters": MIX, "adapter_id": "a"}, "adapters", "invalid_value"),
    ({"adapters": MIX, "route": {"experts": ["a", "b"]}}, "route", "invalid_value"),
    ({"route": {"experts": ["a"], "top_k": 1}, "adapter_id": "a"}, "route", "invalid_value"),
    ({"adapters": []}, "adapters", None),
    ({"adapters": [{"id": "a"}, {"id": "a", "weight": 2.0}]}, "adapters.1.id", "duplicate_adapter"),
    ({"adapters": [{"id": "a"}, {"id": "b", "weight": float("inf")}]}, "adapters.1.weight", None),
    ({"adapters": [{"id": "a"}, {"id": "b", "weight": float("nan")}]}, "adapters.1.weight", None),
    ({"adapters": [{"id": "a", "weight": 1e300}, {"id": "b"}]}, "adapters.0.weight", "invalid_value"),  # f32 inf
    ({"route": {"experts": ["a", "b"], "top_k": 1, "temperature": 1e-300}}, "route.temperature",  # f32 0
     "invalid_value"),
    ({"adapters": [{"id": "a", "weight": "0.5"}]}, "adapters.0.weight", None),
    ({"adapters": [{"id": ""}]}, "adapters.0.id", None),
    ({"adapters": [{"weight": 1.0}]}, "adapters.0.id", None),
    ({"adapters": [{"id": "a", "scale": 2}]}, "adapters.0.scale", "unsupported"),
    ({"adapters": {"a": 1.0}}, "adapters", None),
    ({"route": {"experts": []}}, "route.experts", None),
    ({"route": {"experts": [f"x{i}" for i in range(257)]}}, "route.experts", None),
    ({"adapters": [{"id": f"x{i}"} for i in range(257)]}, "adapters", None),
    ({"route": {"experts": ["a", "b"], "top_k": 0}}, "route.top_k", None),
    ({"route": {"experts": ["a", "b"], "top_k": 3}}, "route.top_k", "invalid_value"),
    ({"route": {"experts": ["a", "b"], "top_k": 1.5}}, "route.top_k", None),
    ({"route": {"experts": ["a", "b"], "temperature": 0}}, "route.temperature", None),
    ({"route": {"experts": ["a", "b"], "temperature": -1.0}}, "route.temperature", None),
    ({"route": {"experts": ["a", "b"], "temperature": float("inf")}}, "route.temperature", None),
    ({"route": {"experts": ["a", "b"], "use_gks": True}}, "route.use_gks", "unsupported"),
    ({"route": {"experts": ["a", "b"], "router": "phatgoose"}}, "route.router", "unsupported"),
    ({"route": {"experts": ["a", "a"], "top_k": 1}}, "route.experts.1", "duplicate_adapter"),
]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("extra,param,code", BAD)
def test_bad_expert_fields_are_400s_naming_the_field(server, path, extra, param, code):
    body = {"model": BASE, "max_tokens": 2, **extra}
    body.update({"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]})
    err = error(post(server, body, path=path))
    assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    assert err["message"]


def test_model_must_be_the_base(server):
    err = error(post(server, {"model": "a", "prompt": "hi", "adapters": MIX}))
    assert err["param"] == "model" and BASE in err["message"]
    err = error(post(server, {"model": "a", "prompt": "hi", "route": {"experts": ["a", "b"], "top_k": 1}}))
    assert err["param"] == "model"


def test_unknown_and_foreign_experts_are_404s_naming_them(server):
    """globex cannot see acme's adapter `mine`: it answers exactly as a name that does not exist."""
    for field, body, param in (
            ("adapters", {"adapters": [{"id": "a"}, {"id": "NAME"}]}, "adapters.1.id"),
            ("route", {"route": {"experts": ["NAME", "a"], "top_k": 1}}, "route.experts.0")):
        answers = []
        for name in ("mine", "no-such-adapter"):
            raw = json.loads(json.dumps(body).replace("NAME", name))
            err = error(post(server, {"model": BASE, "prompt": "hi", **raw}, tenant="globex"), 404)
            assert err["param"] == param and err["code"] == "model_not_found", err
            answers.append({**err, "message": err["message"].replace(name, "X")})
        assert answers[0] == answers[1], field
    # acme may use its own adapter in a mixture (`completion` checks that it generated).
    completion(server, "acme", max_tokens=2, adapters=[{"id": "mine"}, {"id": "a"}])


def test_limits(server):
    """--max-mixture-experts 5, --max-route-experts 4, --max-loras 4 (step capacity),
    --max-mixture-rank 40 (an adapter not read yet counts --max-lora-rank 16)."""
    five = [{"id": n} for n in (*SHARED, "mine")]
    err = error(post(server, {"model": BASE, "prompt": "hi", "adapters": five}))
    assert err["code"] == "too_many_experts" and err["param"] == "adapters" and "--max-loras" in err["message"]
    err = error(post(server, {"model": BASE, "prompt": "hi", "route": {"experts": [*SHARED, "mine"]}}))
    assert err["code"] == "too_many_experts" and err["param"] == "route.experts"
    assert "--max-route-experts" in err["message"]
    # A route naming no experts: acme may use 5 adapters, over the limit of 4: told to name them.
    err = error(post(server, {"model": BASE, "prompt": "hi", "route": {"top_k": 2}}))
    assert err["param"] == "route.experts" and "name the experts" in err["message"]


def test_total_rank_counts_unread_adapters_at_the_slot_rank(server):
    """c and d have never been read: 3 x 16 > 40 is refused; once read (rank 4 each), it runs."""
    body = {"model": BASE, "prompt": PROMPT, "max_tokens": 1, "adapters": [{"id": "b"}, {"id": "c"}, {"id": "d"}]}
    err = error(post(server, body))
    assert err["code"] == "too_many_experts" and "--max-mixture-rank" in err["message"]
    for name in ("b", "c", "d"):  # one single-adapter request each reads it
        completion(server, max_tokens=1, model=name)
    r = post(server, body)
    assert r.status_code == 200, r.text


def test_quotas_apply_to_mixtures_and_routes(server):
    """globex has 200 tokens per minute: a mixture needing more at once is refused as any request is."""
    for extra in ({"adapters": MIX}, {"route": {"experts": ["a", "b"], "top_k": 1}}):
        err = error(post(server, {"model": BASE, "prompt": PROMPT, "max_tokens": 300, **extra}, tenant="globex"))
        assert err["code"] == "request_too_large", err


def test_a_dora_expert_is_refused(server):
    """`dora` is a DoRA adapter in the store, never read: the mixture waits for its load, which
    shows it is DoRA (or, before DoRA parsing lands, fails it): 400 adapter_unsupported either way;
    after that the refusal comes at validation."""
    for _ in range(2):
        err = error(post(server, {"model": BASE, "prompt": PROMPT, "max_tokens": 2,
                                  "adapters": [{"id": "a"}, {"id": "dora"}]}))
        assert err["code"] == "adapter_unsupported", err
    err = error(post(server, {"model": BASE, "prompt": PROMPT, "max_tokens": 2,
                              "route": {"experts": ["dora", "a"], "top_k": 1}}))
    assert (err["code"], err["param"]) == ("adapter_unsupported", "route.experts.0"), err


# --- running ------------------------------------------------------------------------------------

def test_mixture_and_route_run_from_the_openai_client(server):
    c = client(server)
    r = c.completions.create(model=BASE, prompt="hello", max_tokens=4, temperature=0,
                             extra_body={"adapters": MIX, "ignore_eos": True})
    assert r.usage.completion_tokens == 4 and r.choices[0].text
    r = c.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                  temperature=0, extra_body={"route": {"experts": ["a", "b", "c"], "top_k": 2,
                                                                       "temperature": 0.5}, "ignore_eos": True})
    # a random model's 4 tokens may decode to nothing printable: count them, not the text
    assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "length"
    stream = c.completions.create(model=BASE, prompt="hello", max_tokens=4, temperature=0, stream=True,
                                  extra_body={"route": {"experts": ["a", "b"], "top_k": 1}, "ignore_eos": True})
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices)


def test_one_expert_at_weight_one_is_that_adapter(server):
    single = completion(server, model="a", max_tokens=8)
    assert single != completion(server, max_tokens=8)  # the adapter changes the output: the check can fail
    assert completion(server, max_tokens=8, adapters=[{"id": "a", "weight": 1.0}]) == single
    assert completion(server, max_tokens=8, route={"experts": ["a"], "top_k": 1}) == single


def test_a_zero_weight_mixture_is_the_base(server):
    assert completion(server, max_tokens=8, adapters=[{"id": "a", "weight": 0.0}]) == completion(server, max_tokens=8)


def test_mixtures_routes_singles_and_base_share_batches(server):
    """Eight requests of four kinds at once, each answering as it does alone (greedy)."""
    kinds = [dict(), dict(model="c"), dict(adapters=MIX), dict(route={"experts": ["b", "c", "d"], "top_k": 2})]
    alone = [completion(server, max_tokens=12, **k) for k in kinds]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda k: completion(server, max_tokens=12, **k), kinds * 2))
    assert together == alone * 2


def test_metrics_count_mixture_and_routed_requests_and_experts_per_token(server):
    """A mixture of 2 then a route with top_k 3, each alone: every LoRA token (5 prompt + 3 more
    computed of 4 generated) is observed at 2, then at 3; requests counted per tenant."""
    def snap():
        return (server.metric("loramux_tenant_mixture_requests_total", 'tenant="acme"'),
                server.metric("loramux_tenant_routed_requests_total", 'tenant="acme"'),
                server.metric("loramux_experts_per_lora_token_count"),
                server.metric("loramux_experts_per_lora_token_sum"))

    m0, r0, n0, s0 = snap()
    completion(server, max_tokens=4, adapters=MIX)
    m1, r1, n1, s1 = snap()
    assert (m1 - m0, r1 - r0, n1 - n0, s1 - s0) == (1, 0, 8, 16)
    completion(server, max_tokens=4, route={"experts": ["a", "b", "c"], "top_k": 3})
    m2, r2, n2, s2 = snap()
    assert (m2 - m1, r2 - r1, n2 - n1, s2 - s1) == (0, 1, 8, 24)
    assert server.metric("loramux_tenant_routed_requests_total", 'tenant="globex"') == 0  # series present at 0


def test_listings_show_dora_and_routing_ready(server):
    """routing_ready: in the host cache (prototypes computed); `dora`: null until read."""
    cards = {m["id"]: m for m in httpx.get(server.base_url + "/v1/models", headers=auth("acme")).json()["data"]}
    assert {"a", "b", "c", "d", "mine", "dora"} <= set(cards)
    assert cards["a"]["routing_ready"] is True  # used above
    assert all("dora" in cards[n] and "routing_ready" in cards[n] for n in (*SHARED, "mine", "dora"))
    assert cards["a"]["dora"] in (None, False)
    listing = {a["id"]: a for a in httpx.get(server.base_url + "/v1/adapters", headers=auth("globex")).json()}
    assert "mine" not in listing and listing["b"]["routing_ready"] is True
    assert BASE not in listing and "routing_ready" not in cards[BASE]
