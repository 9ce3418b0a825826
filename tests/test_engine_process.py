"""`--engine-process on`: the engine core in its own process, the HTTP server talking to it over
ZeroMQ. A real server in that mode, through the openai client and httpx: generation as the
engine computes it in-process, chat streaming, an abort on disconnect that frees the sequence,
admin adapter load/unload, a tenants reload, engine metrics on /metrics, the core's death
answered with 503s (never a hang), and a shutdown that leaves no process behind. The text level
(detokenisation, stop strings) runs in the server process there: what clients get is compared
with a server of the same build in the thread mode."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

from peft_adapters import make_peft_adapter
from server.config import Config
from server.engine.engine import LLMEngine
from server.engine.request import GenerationRequest, SamplingParams
from server.tenants.keys import hash_key
from server_process import ServerProcess

BASE = "tiny"
ADMIN = "admin-secret"
ALPHA, GAMMA = "key-alpha", "key-gamma"


def tenants_toml(gamma: bool = False) -> str:
    text = f'[tenants.alpha]\nkeys = ["{hash_key(ALPHA)}"]\n'
    if gamma:
        text += f'\n[tenants.gamma]\nweight = 2.0\nkeys = ["{hash_key(GAMMA)}"]\n'
    return text


def start(model: Path, tmp: Path, tenants: Path, roots: Path, log: str, mode: str = "on") -> ServerProcess:
    return ServerProcess(["--model", str(model), "--served-model-name", BASE, "--dtype", "float32",
                          "--kv-cache-memory", "8MiB", "--num-threads", "1", "--adapters-dir", "",
                          "--tenants", str(tenants), "--admin-key", ADMIN, "--allowed-adapter-roots", str(roots),
                          "--engine-process", mode], tmp / log)


def core_pid(srv: ServerProcess) -> int:
    """The engine core's pid, as the server logs it once the core is ready."""
    for line in srv.log_path.read_text().splitlines():
        if "engine core process" in line and "ready" in line:
            return int(line.split("engine core process", 1)[1].split()[0])
    raise AssertionError("no engine core in the log:\n" + srv.log())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


@pytest.fixture(scope="module")
def roots(tiny_llama_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapter-roots")
    make_peft_adapter(tiny_llama_dir, root / "qv", seed=3, target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8)
    return root


@pytest.fixture(scope="module")
def tenants(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tenants") / "tenants.toml"
    path.write_text(tenants_toml())
    return path


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tenants, roots, tmp_path_factory):
    srv = start(tiny_llama_dir, tmp_path_factory.mktemp("logs"), tenants, roots, "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=ALPHA, max_retries=0, timeout=60)


def admin(server, path: str, **body) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body or None, headers={"Authorization": f"Bearer {ADMIN}"},
                      timeout=60)


def test_the_engine_runs_in_another_process(server):
    pid = core_pid(server)
    assert pid != server.proc.pid and alive(pid)
    assert int(Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[1]) == server.proc.pid  # its child


def test_greedy_completion_is_what_the_engine_computes_in_process(server, client, tiny_llama_dir):
    prompts = [[5, 9, 13, 2, 7], [30, 31, 32]]
    cfg = Config()
    cfg.model.dtype, cfg.model.device, cfg.model.num_threads = "float32", "cpu", 1
    cfg.cache.kv_cache_memory = 8 << 20
    cfg.lora.adapters_dir = ""
    engine = LLMEngine(cfg, tiny_llama_dir)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(GenerationRequest(f"r{i}", p, params))
    texts = {f"r{i}": "" for i in range(len(prompts))}
    while engine.has_unfinished():
        for out in engine.step():
            texts[out.request_id] += out.text
    r = client.completions.create(model=BASE, prompt=prompts, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    got = {c.index: c.text for c in r.choices}
    assert [got[0], got[1]] == [texts["r0"], texts["r1"]]
    assert r.usage.completion_tokens == 24


def test_chat_streaming_gives_the_same_text_as_the_whole_answer(client):
    messages = [{"role": "user", "content": "hello there"}]
    whole = client.chat.completions.create(model=BASE, messages=messages, max_tokens=10, temperature=0,
                                           extra_body={"ignore_eos": True})
    chunks = list(client.chat.completions.create(model=BASE, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_client_disconnect_aborts_and_frees_the_sequence(server, client):
    aborted = server.metric("loramux_requests_total", 'finish_reason="abort"')
    body = {"model": BASE, "prompt": "long", "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {ALPHA}"}) as r:
        lines = r.iter_lines()
        assert any(next(lines).startswith("data: ") for _ in range(4))
        assert server.metric("loramux_kv_blocks_used") > 0  # its KV blocks, held in the core
    assert wait_for(lambda: server.metric("loramux_requests_total", 'finish_reason="abort"') == aborted + 1)
    assert wait_for(lambda: server.metric("loramux_kv_blocks_used") == 0
                    and server.metric("vllm:num_requests_running") == 0)
    assert client.completions.create(model=BASE, prompt="still there?", max_tokens=3).choices[0].text is not None


def test_admin_load_serve_and_unload_an_adapter(server, client, roots):
    before = client.completions.create(model=BASE, prompt=[5, 6, 7], max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].text
    r = admin(server, "/v1/load_lora_adapter", lora_name="qv", lora_path=str(roots / "qv"))
    assert r.status_code == 200, r.text
    assert "qv" in [m.id for m in client.models.list().data]  # the server's replica knows it at once
    again = admin(server, "/v1/load_lora_adapter", lora_name="qv", lora_path=str(roots / "qv"))
    assert again.status_code == 400 and again.json()["error"]["code"] == "adapter_exists"  # the core's refusal
    with_adapter = client.completions.create(model="qv", prompt=[5, 6, 7], max_tokens=8, temperature=0,
                                             extra_body={"ignore_eos": True}).choices[0].text
    assert with_adapter != before  # the adapter's delta reached the core's forward
    assert server.metric("loramux_requests_total", 'adapter="qv"') >= 1
    r = admin(server, "/v1/unload_lora_adapter", lora_name="qv")
    assert r.status_code == 200, r.text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="qv", prompt=[5, 6, 7], max_tokens=2)
    assert admin(server, "/v1/unload_lora_adapter", lora_name="qv").status_code == 404


def test_tenants_reload_reaches_the_engine(server, tenants):
    gamma = openai.OpenAI(base_url=server.base_url + "/v1", api_key=GAMMA, max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError):
        gamma.completions.create(model=BASE, prompt="hi", max_tokens=2)
    tenants.write_text(tenants_toml(gamma=True))
    r = admin(server, "/v1/admin/reload_tenants")
    assert r.status_code == 200, r.text
    gamma.completions.create(model=BASE, prompt="hi", max_tokens=2)
    # The finish is counted in the core, under the tenant the reload added.
    assert server.metric("loramux_tenant_requests_total", 'status="length",tenant="gamma"') == 1


def test_metrics_show_the_engine_series_once(server, client):
    client.completions.create(model=BASE, prompt="count me", max_tokens=4, extra_body={"ignore_eos": True})
    text = httpx.get(server.base_url + "/metrics", timeout=10).text
    assert server.metric("loramux_generation_tokens_total") >= 4
    assert server.metric("loramux_kv_blocks_total") > 0
    assert server.metric("loramux_step_seconds_count") > 0
    assert 'vllm:num_requests_running{engine="0",model_name="tiny"}' in text
    # One HELP line per family: the two processes' series are merged, not concatenated.
    helps = [line.split()[2] for line in text.splitlines() if line.startswith("# HELP ")]
    assert len(helps) == len(set(helps))
    # A refusal counted by the server process and one counted by the core, side by side.
    httpx.post(server.base_url + "/v1/completions", json={"model": "nope", "prompt": "x"},
               headers={"Authorization": f"Bearer {ALPHA}"}, timeout=10)
    assert server.metric("loramux_http_errors_total", 'code="model_not_found"') >= 1


def test_a_sighup_reloads_tenants_in_the_server_and_leaves_the_core_running(server, client):
    """SIGHUP is the server's (a tenants reload); sent to the core too (a process group's hangup),
    it must not kill it, as its default action would."""
    pid = core_pid(server)
    os.kill(pid, signal.SIGHUP)
    os.kill(server.proc.pid, signal.SIGHUP)
    time.sleep(0.5)
    assert alive(pid)
    assert client.completions.create(model=BASE, prompt="still here", max_tokens=2).choices[0].text is not None


def test_core_death_gives_503_not_a_hang_and_shutdown_leaves_no_process(tiny_llama_dir, tmp_path, tenants, roots):
    srv = start(tiny_llama_dir, tmp_path, tenants, roots, "dying.log")
    try:
        pid = core_pid(srv)
        body = {"model": BASE, "prompt": "long", "max_tokens": 400, "stream": True, "ignore_eos": True}
        headers = {"Authorization": f"Bearer {ALPHA}"}
        with httpx.stream("POST", srv.base_url + "/v1/completions", json=body, timeout=30, headers=headers) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            os.kill(pid, signal.SIGKILL)
            rest = list(lines)  # the stream ends (with an error event), it does not hang
        assert any('"engine_unavailable"' in line for line in rest), rest[-3:]
        assert wait_for(lambda: httpx.get(srv.base_url + "/health", timeout=5).status_code == 503)
        r = httpx.post(srv.base_url + "/v1/completions", json={"model": BASE, "prompt": "hi", "max_tokens": 2},
                       headers=headers, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
        assert httpx.get(srv.base_url + "/metrics", timeout=10).status_code == 200
    finally:
        srv.stop()
    assert srv.proc.returncode == 0


def test_graceful_shutdown_stops_the_core(tiny_llama_dir, tmp_path, tenants, roots):
    srv = start(tiny_llama_dir, tmp_path, tenants, roots, "stopping.log")
    pid = core_pid(srv)
    try:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key=ALPHA, max_retries=0, timeout=60)
        client.completions.create(model=BASE, prompt="bye", max_tokens=2)
    finally:
        srv.stop()
    assert srv.proc.returncode == 0
    assert wait_for(lambda: not alive(pid), timeout=10), "the engine core outlived the server"
    import tempfile

    assert not list(Path(tempfile.gettempdir()).glob(f"loramux-ipc-{srv.proc.pid}-*"))  # its sockets' directory


def test_metrics_of_two_processes_merge_into_one_exposition():
    """/metrics with the engine in its own process: each family once, a series written in either
    process keeps its value, one written in both (tenant outcomes) is their sum."""
    from prometheus_client.parser import text_string_to_metric_families

    from server.metrics import Metrics, exposition

    server_side, core = Metrics(), Metrics()
    server_side.set_tenants(["alpha"])
    core.set_tenants(["alpha"])
    server_side.tenant_requests.labels("alpha", "rate_limited").inc(2)  # a refusal: counted by the server
    core.on_finish("alpha", "", "stop", 5, 0.4, 0.1)  # a finish: counted by the core
    core.on_generated({"alpha": 7})
    core.configure_engine("m", 16, 100, 4)
    text = exposition(server_side.registry, core.registry.collect()).decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    helps = [line.split()[2] for line in text.splitlines() if line.startswith("# HELP ")]
    assert len(helps) == len(set(helps))

    def sample(family: str, name: str, **labels) -> float:
        return sum(s.value for s in fams[family].samples if s.name == name and s.labels == labels)

    outcomes = "loramux_tenant_requests"
    assert sample(outcomes, outcomes + "_total", tenant="alpha", status="rate_limited") == 2
    assert sample(outcomes, outcomes + "_total", tenant="alpha", status="stop") == 1
    assert sample("loramux_generation_tokens", "loramux_generation_tokens_total") == 7
    assert sample("loramux_kv_blocks_total", "loramux_kv_blocks_total") == 100
    assert sample("loramux_e2e_request_latency_seconds", "loramux_e2e_request_latency_seconds_count",
                  adapter="") == 1


# --- the text level in the server process: the same answers as in-process ----------------------


@pytest.fixture(scope="module")
def thread_server(tiny_llama_dir, tenants, roots, tmp_path_factory):
    srv = start(tiny_llama_dir, tmp_path_factory.mktemp("logs"), tenants, roots, "thread.log", mode="off")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def both(server, thread_server) -> dict[str, openai.OpenAI]:
    return {mode: openai.OpenAI(base_url=srv.base_url + "/v1", api_key=ALPHA, max_retries=0, timeout=60)
            for mode, srv in (("on", server), ("off", thread_server))}


STOP_PROMPT = [5, 9, 13, 2, 7, 40, 41]
MAX_TOKENS = 400
STOP_OVERRUN = 40  # steps the core may run past a stop string (2 at most measured, under load): << MAX_TOKENS


@pytest.fixture(scope="module")
def pieces(both) -> list[str]:
    """The greedy completion of STOP_PROMPT (24 tokens, no stop), one text piece per token as the
    thread-mode server streams it without stop strings (nothing held back)."""
    chunks = both["off"].completions.create(model=BASE, prompt=STOP_PROMPT, max_tokens=24, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) == 24
    return texts


def stop_cases(pieces: list[str]) -> dict[str, tuple[list[str], bool, int, int]]:
    """Stop strings found in the completion: case -> (stop, include, where the text ends, tokens used)."""
    full = "".join(pieces)
    ends = [len("".join(pieces[: i + 1])) for i in range(len(pieces))]

    def tokens_to(pos: int) -> int:  # tokens up to and including the one whose text reaches `pos`
        return next(i + 1 for i, e in enumerate(ends) if e >= pos)

    # a string spanning a token boundary: the last character of one token, the first of the next
    b = next(ends[i] for i in range(3, 20) if pieces[i] and pieces[i + 1] and full.find(full[ends[i] - 1:ends[i] + 1])
             == ends[i] - 1)
    span = full[b - 1:b + 1]
    one = full[ends[5]:ends[5] + 1]
    i_one = full.index(one)
    late = full[ends[12]:ends[12] + 2]
    i_late = full.index(late)
    return {
        "spanning": ([span], False, b - 1, tokens_to(b + 1)),
        "spanning, included": ([span], True, b + 1, tokens_to(b + 1)),
        "several": ([late, one], False, min(i_one, i_late), tokens_to(min(i_one + 1, i_late + 2))),
    }


def completion(client: openai.OpenAI, stream: bool, stop: list[str], include: bool, n: int = 1):
    """(texts by choice, finish reasons, prompt tokens, completion tokens)."""
    kwargs = dict(model=BASE, prompt=STOP_PROMPT, max_tokens=24, temperature=0, stop=stop, n=n,
                  extra_body={"ignore_eos": True, "include_stop_str_in_output": include})
    if not stream:
        r = client.completions.create(**kwargs)
        return ([c.text for c in r.choices], [c.finish_reason for c in r.choices], r.usage.prompt_tokens,
                r.usage.completion_tokens)
    texts, reasons, usage = [""] * n, [None] * n, None
    for chunk in client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        for c in chunk.choices:
            texts[c.index] += c.text
            reasons[c.index] = c.finish_reason or reasons[c.index]
        usage = chunk.usage or usage
    return texts, reasons, usage.prompt_tokens, usage.completion_tokens


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("case", ["spanning", "spanning, included", "several"])
def test_stop_strings_give_the_same_text_reason_and_usage_in_both_modes(both, pieces, case, stream):
    stop, include, end, used = stop_cases(pieces)[case]
    full = "".join(pieces)
    expected = ([full[:end]], ["stop"], len(STOP_PROMPT), used)
    assert completion(both["off"], stream, stop, include) == expected
    assert completion(both["on"], stream, stop, include) == expected


def test_n_choices_with_a_stop_string_in_both_modes(both, pieces):
    stop, include, end, used = stop_cases(pieces)["spanning"]
    full = "".join(pieces)
    for mode in ("off", "on"):
        for stream in (False, True):
            got = completion(both[mode], stream, stop, include, n=2)
            # The prompt counts once (streamed too), each choice's tokens count.
            assert got == ([full[:end]] * 2, ["stop"] * 2, len(STOP_PROMPT), 2 * used), (mode, stream)


def test_chat_with_a_stop_string_and_logprobs_is_the_same_in_both_modes(both):
    messages = [{"role": "user", "content": "Ça va? 日本語"}]

    def chat(client, stop=None):
        return client.chat.completions.create(model=BASE, messages=messages, max_tokens=20, temperature=0,
                                              stop=stop, logprobs=True, top_logprobs=2,
                                              extra_body={"ignore_eos": True})

    plain = chat(both["off"]).choices[0]
    text = plain.message.content
    assert len(text) > 6
    stop = text[3:5]
    answers = {mode: chat(c, [stop]) for mode, c in both.items()}
    on, off = answers["on"], answers["off"]
    assert off.choices[0].message.content == text[: text.index(stop)]
    assert on.choices[0].message.content == off.choices[0].message.content
    assert on.choices[0].finish_reason == off.choices[0].finish_reason == "stop"
    assert on.usage == off.usage
    assert on.choices[0].logprobs.model_dump() == off.choices[0].logprobs.model_dump()  # token strings too
    assert len(on.choices[0].logprobs.content) == on.usage.completion_tokens


def test_free_text_and_unicode_are_the_same_in_both_modes(both):
    """Random tiny-model output: bytes of characters split across tokens, partial characters."""
    for prompt in ([250, 251, 252, 253], [200, 201, 202], "日本語のテキスト"):
        answers = [completion_text(c, prompt) for c in (both["off"], both["on"])]
        assert answers[0] == answers[1], prompt


def completion_text(client: openai.OpenAI, prompt) -> tuple[str, str]:
    whole = client.completions.create(model=BASE, prompt=prompt, max_tokens=30, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=BASE, prompt=prompt, max_tokens=30, temperature=0, stream=True, extra_body={"ignore_eos": True})
        if c.choices)
    assert whole == streamed
    return whole, streamed


def test_a_stop_string_retires_the_request_in_the_core(server, client, pieces):
    """The server process finds the stop string; the core must stop generating for it at once (its KV
    blocks come back) and count it as stopped, not run on to max_tokens nor count an abort."""
    stop = pieces[2] + pieces[3]
    idle = lambda text: (server.metric("loramux_kv_blocks_used", text=text) == 0  # noqa: E731
                         and server.metric("vllm:num_requests_running", text=text) == 0)
    assert wait_for(lambda: idle(server.scrape()))  # the baseline is taken with nothing still running
    before = server.scrape()
    r = client.completions.create(model=BASE, prompt=STOP_PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                  stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens <= 4

    def grew(name: str, labels: str = "") -> float:
        return server.metric(name, labels, text=after) - server.metric(name, labels, text=before)

    assert wait_for(lambda: idle(server.scrape()))  # retired in the core (blocks back), and counted ...
    after = server.scrape()
    assert grew("loramux_requests_total", 'finish_reason="stop"') == 1  # ... as stopped,
    assert grew("loramux_requests_total", 'finish_reason="abort"') == 0  # not as aborted
    # The core runs on until the FINISH reaches it: a step or two here, more when the server process
    # waits for a core (both cores busy), never to max_tokens. The bound leaves room for that wait.
    assert grew("loramux_generation_tokens_total") <= r.usage.completion_tokens + STOP_OVERRUN, grew(
        "loramux_generation_tokens_total")
