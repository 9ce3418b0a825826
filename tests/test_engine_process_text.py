"""The text level (detokenisation, stop strings) runs in the server process when the engine core has
a process of its own: what clients get there is compared with a server of the same build in the
thread mode (`--engine-process off`), and a stop string found by the server retires the request
in the core. A third server runs its core with `--async-scheduling` (a step launched before the
previous one's tokens are taken in): its answers are the same."""

from __future__ import annotations

import openai
import pytest

# the fixtures `roots` and `tenants` come from there
from engine_process_servers import ALPHA, BASE, roots, start, tenants, wait_for  # noqa: F401
from server_process import ServerProcess, stop_all


# --- the text level in the server process: the same answers as in-process ----------------------


@pytest.fixture(scope="module")
def servers(tiny_llama_dir, tenants, roots, tmp_path_factory) -> dict[str, ServerProcess]:
    """The engine-process ("on"), thread ("off") and async-scheduling ("async") servers, started
    side by side (a start is mostly one process importing: the 2 cores take two at once)."""
    logs = tmp_path_factory.mktemp("logs")
    flags = {"on": ("server.log", "on"), "off": ("thread.log", "off"), "async": ("async.log", "on", "--async-scheduling")}
    started: dict[str, ServerProcess] = {}
    try:
        for name, (log, *args) in flags.items():
            started[name] = start(tiny_llama_dir, logs, tenants, roots, log, *args, wait=False)
        for srv in started.values():
            srv.wait_ready()
        yield started
    finally:
        stop_all(started.values())


@pytest.fixture(scope="module")
def server(servers) -> ServerProcess:
    return servers["on"]


@pytest.fixture(scope="module")
def thread_server(servers) -> ServerProcess:
    return servers["off"]


@pytest.fixture(scope="module")
def async_server(servers) -> ServerProcess:
    return servers["async"]


@pytest.fixture(scope="module")
def both(server, thread_server, async_server) -> dict[str, openai.OpenAI]:
    """Clients of the engine-process ("on"), thread ("off") and async-scheduling ("async") servers."""
    return {mode: openai.OpenAI(base_url=srv.base_url + "/v1", api_key=ALPHA, max_retries=0, timeout=60)
            for mode, srv in (("on", server), ("off", thread_server), ("async", async_server))}


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
    for mode in ("off", "on", "async"):
        assert completion(both[mode], stream, stop, include) == expected, mode


def test_n_choices_with_a_stop_string_in_both_modes(both, pieces):
    stop, include, end, used = stop_cases(pieces)["spanning"]
    full = "".join(pieces)
    for mode in ("off", "on", "async"):
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

    # Every server sees the same requests, so its prefix cache holds the same (usage compares it).
    text = {mode: chat(c) for mode, c in both.items()}["off"].choices[0].message.content
    assert len(text) > 6
    stop = text[3:5]
    answers = {mode: chat(c, [stop]) for mode, c in both.items()}
    off = answers["off"]
    assert off.choices[0].message.content == text[: text.index(stop)]
    for mode in ("on", "async"):
        on = answers[mode]
        assert on.choices[0].message.content == off.choices[0].message.content, mode
        assert on.choices[0].finish_reason == off.choices[0].finish_reason == "stop"
        assert on.usage == off.usage
        assert on.choices[0].logprobs.model_dump() == off.choices[0].logprobs.model_dump()  # token strings too
        assert len(on.choices[0].logprobs.content) == on.usage.completion_tokens


def test_free_text_and_unicode_are_the_same_in_both_modes(both):
    """Random tiny-model output: bytes of characters split across tokens, partial characters."""
    for prompt in ([250, 251, 252, 253], [200, 201, 202], "日本語のテキスト"):
        answers = [completion_text(c, prompt) for c in (both["off"], both["on"], both["async"])]
        assert answers[0] == answers[1] == answers[2], prompt


def completion_text(client: openai.OpenAI, prompt) -> tuple[str, str]:
    whole = client.completions.create(model=BASE, prompt=prompt, max_tokens=30, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=BASE, prompt=prompt, max_tokens=30, temperature=0, stream=True, extra_body={"ignore_eos": True})
        if c.choices)
    assert whole == streamed
    return whole, streamed


@pytest.mark.parametrize("scheduling", ["sync", "async"])
def test_a_stop_string_retires_the_request_in_the_core(server, async_server, pieces, scheduling):
    """The server process finds the stop string; the core must stop generating for it at once (its KV
    blocks come back) and count it as stopped, not run on to max_tokens nor count an abort. Async:
    the step in flight when the core hears of it is dropped for it."""
    server = async_server if scheduling == "async" else server
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=ALPHA, max_retries=0, timeout=60)
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
