"""The official `openai` Python client against `trellis serve` on the tiny GLM fixture.

Run by `.ci/run` after `cargo test` (which builds the `trellis` binary):

    .venv-ci/bin/python -m pytest tests/openai_client

The binary is `$TRELLIS_BIN`, else `$CARGO_TARGET_DIR/debug/trellis` (default `target/`);
the fixtures are `$TRELLIS_FIXTURES`, else `../shared/fixtures`. Both are required: a missing
one fails the run rather than skipping it.

The fixture model has random weights, so its text is nonsense: the tests check the protocol
(shapes, streaming, usage, errors) and make outputs deterministic with greedy decoding, seeds
and `logit_bias`.
"""

import json
import os
import pathlib
import queue
import re
import signal
import subprocess
import threading

import openai
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL_NAME = "tiny-glm"
API_KEY = "test-key"
CTX = 512
# Special tokens of the fixture's tokenizer.
TOOL_CALL_END = 2041
OBSERVATION = 2037


def trellis_binary() -> pathlib.Path:
    if os.environ.get("TRELLIS_BIN"):
        return pathlib.Path(os.environ["TRELLIS_BIN"])
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    return target / "debug" / "trellis"


def fixture_model() -> pathlib.Path:
    fixtures = pathlib.Path(os.environ.get("TRELLIS_FIXTURES", ROOT.parent / "shared" / "fixtures"))
    return fixtures / "exl3" / "glm4-moe-lite-tiny-4.0bpw"


class Server:
    """`trellis serve` on a free port; `stop()` sends SIGTERM and expects a clean exit."""

    def __init__(self, *extra_args: str, env_key: str | None = API_KEY):
        binary, model = trellis_binary(), fixture_model()
        assert binary.is_file(), f"{binary} not found: build it with `cargo build` first"
        assert (model / "config.json").is_file(), f"fixture model not found at {model}"
        env = dict(os.environ)
        env.pop("TRELLIS_API_KEY", None)
        if env_key is not None:
            # The key comes from the environment, as deployments pass it.
            env["TRELLIS_API_KEY"] = env_key
        command = [
            str(binary), "serve", str(model), "--port", "0",
            "--served-model-name", MODEL_NAME, "--ctx-size", str(CTX), *extra_args,
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.process.stdout],
                         daemon=True).start()
        try:
            line = lines.get(timeout=120)
        except queue.Empty:
            self.process.kill()
            raise AssertionError("trellis serve did not start within 120 s")
        match = re.search(r"http://([\d.]+):(\d+)", line)
        assert match, f"unexpected first line: {line!r}"
        self.base_url = f"http://{match.group(1)}:{match.group(2)}/v1"

    def client(self, api_key: str = API_KEY) -> openai.OpenAI:
        # No retries: the tests look at the first answer (429 and 5xx would be retried).
        return openai.OpenAI(api_key=api_key, base_url=self.base_url, max_retries=0, timeout=120)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=60) == 0, "trellis serve exits cleanly on SIGTERM"


@pytest.fixture(scope="module")
def server():
    server = Server("--max-batch", "4", "--max-body-bytes", "1000000")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def reasoning_of(message) -> str | None:
    """`reasoning_content`, an extension field the client keeps as an extra attribute."""
    return getattr(message, "reasoning_content", None)


def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME


def test_chat(client):
    answer = client.chat.completions.create(
        model=MODEL_NAME, messages=user("Tell me a story."), max_tokens=8,
        extra_body={"ignore_eos": True},
    )
    choice = answer.choices[0]
    assert answer.object == "chat.completion"
    assert choice.finish_reason == "length"
    assert choice.message.role == "assistant"
    # The GLM prompt ends with <think>: the random output is reasoning.
    assert reasoning_of(choice.message)
    assert answer.usage.completion_tokens == 8
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 8


def test_chat_stream_has_reasoning_deltas_and_usage(client):
    kwargs = dict(model=MODEL_NAME, messages=user("Tell me a story."), max_tokens=10,
                  extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kwargs)
    stream = client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True})
    reasoning, content, finish, usage, roles = "", "", None, None, []
    for chunk in stream:
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage
            continue
        delta = chunk.choices[0].delta
        roles.append(delta.role)
        reasoning += reasoning_of(delta) or ""
        content += delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    assert roles[0] == "assistant"
    assert reasoning and reasoning == reasoning_of(whole.choices[0].message)
    assert content == (whole.choices[0].message.content or "")
    assert finish == "length"
    assert usage.completion_tokens == 10
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_without_thinking(client):
    answer = client.chat.completions.create(
        model=MODEL_NAME, messages=user("Hi"), max_tokens=6,
        extra_body={"ignore_eos": True, "chat_template_kwargs": {"enable_thinking": False}},
    )
    assert answer.choices[0].message.content
    assert not reasoning_of(answer.choices[0].message)


def test_completions_whole_streamed_and_token_prompt(client):
    kwargs = dict(model=MODEL_NAME, max_tokens=12, extra_body={"ignore_eos": True})
    whole = client.completions.create(prompt="Once upon a time", **kwargs)
    text = whole.choices[0].text
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 12
    streamed = client.completions.create(prompt="Once upon a time", stream=True, **kwargs)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text
    ids = client.post("/tokenize", body={"prompt": "Once upon a time"}, cast_to=object)["tokens"]
    by_ids = client.completions.create(prompt=ids, **kwargs)
    assert by_ids.choices[0].text == text


def test_stop_strings(client):
    kwargs = dict(model=MODEL_NAME, prompt="The sea was", max_tokens=16,
                  extra_body={"ignore_eos": True})
    text = client.completions.create(**kwargs).choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cut = text[:text.index(stop)]
    stopped = client.completions.create(**kwargs, stop=[stop, "never appears"])
    assert stopped.choices[0].text == cut
    assert stopped.choices[0].finish_reason == "stop"
    # In a chat answer too (thinking off, so the text is content).
    chat = dict(model=MODEL_NAME, messages=user("Hi"), max_tokens=16,
                extra_body={"ignore_eos": True,
                            "chat_template_kwargs": {"enable_thinking": False}})
    content = client.chat.completions.create(**chat).choices[0].message.content
    stop = content[len(content) // 2:len(content) // 2 + 3]
    answer = client.chat.completions.create(**chat, stop=stop)
    assert answer.choices[0].message.content == content[:content.index(stop)]
    assert answer.choices[0].finish_reason == "stop"


def test_seed_reproduces_sampling(client):
    def sample(seed):
        return client.completions.create(
            model=MODEL_NAME, prompt="It was a dark", max_tokens=24, temperature=1.0,
            seed=seed, extra_body={"ignore_eos": True}).choices[0].text
    assert sample(1234) == sample(1234)
    assert sample(1234) != sample(4321)


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    },
}


def forced_tool_call_kwargs():
    # The random model would not call a tool by itself. `tool_choice` starts the call in the
    # prompt; the biases then make it write `</tool_call>` and, once the presence penalty
    # weighs on that, end its turn with `<|observation|>`. The long message keeps the
    # tools' own tags (in the system prompt) out of the penalty window.
    return dict(
        model=MODEL_NAME,
        messages=user("What will the weather be like in Paris tomorrow, please? " * 6),
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        logit_bias={str(TOOL_CALL_END): 100, str(OBSERVATION): 80},
        presence_penalty=40,
        max_tokens=8,
    )


def test_tool_call_round_trip(client):
    answer = client.chat.completions.create(**forced_tool_call_kwargs())
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {}
    assert call.id.startswith("call_")

    # Streamed: one tool_calls delta carrying the whole call.
    deltas, finish = [], None
    for chunk in client.chat.completions.create(**forced_tool_call_kwargs(), stream=True):
        if chunk.choices:
            deltas += chunk.choices[0].delta.tool_calls or []
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(d.index, d.function.name, d.function.arguments) for d in deltas] == [
        (0, "get_weather", "{}")]

    # The call and its result go back in the conversation; the server renders and runs it.
    messages = user("What is the weather in Paris?") + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 20}'},
    ]
    follow_up = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, tools=[WEATHER_TOOL], max_tokens=4)
    assert follow_up.choices[0].message.role == "assistant"
    rendered = client.post("/tokenize", body={"messages": messages, "tools": [WEATHER_TOOL]},
                           cast_to=object)["tokens"]
    prompt = client.post("/detokenize", body={"tokens": rendered}, cast_to=object)["prompt"]
    assert prompt.endswith(
        "<|assistant|></think><tool_call>get_weather<arg_key>city</arg_key>"
        "<arg_value>Paris</arg_value></tool_call><|observation|>"
        '<tool_response>{"temp": 20}</tool_response><|assistant|><think>')


def test_response_format_json_object_is_accepted(client):
    answer = client.chat.completions.create(
        model=MODEL_NAME, messages=user("Reply in JSON."), max_tokens=2,
        response_format={"type": "json_object"})
    assert answer.choices[0].message.role == "assistant"


def test_errors(server, client):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL_NAME, messages=[])
    assert error.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL_NAME, messages=user("x"), n=2)
    assert error.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL_NAME, messages=user("x"), temperature=-1)
    assert error.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL_NAME, messages=user("word " * 2 * CTX))
    assert error.value.body["code"] == "context_length_exceeded"
    assert str(CTX) in error.value.body["message"]
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="gpt-4o", messages=user("x"))
    assert error.value.body["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").models.list()
    with pytest.raises(openai.APIStatusError) as error:
        client.chat.completions.create(model=MODEL_NAME, messages=user("x" * 2_000_000))
    assert error.value.status_code == 413
    # Still serving.
    assert client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=1).choices


def test_full_queue_and_graceful_shutdown():
    # One place in the batch and one in the queue; no API key.
    server = Server("--max-batch", "1", "--max-queue", "1", env_key=None)
    client = server.client(api_key="unused")
    try:
        running = client.completions.create(
            model=MODEL_NAME, prompt="Tell me a long story", max_tokens=400, stream=True,
            extra_body={"ignore_eos": True})
        for chunk in running:
            if chunk.choices and chunk.choices[0].text:
                break  # It runs.
        waiting = client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=200,
                                            stream=True, extra_body={"ignore_eos": True})
        with pytest.raises(openai.RateLimitError) as error:
            client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=2)
        assert error.value.status_code == 429
        running.close()  # Hanging up cancels it; the waiting request starts.
        first = next(iter(waiting))
        assert first.choices
        # SIGTERM while it runs: it still finishes whole, then the server exits cleanly.
        server.process.send_signal(signal.SIGTERM)
        finish = None
        for chunk in waiting:
            if chunk.choices:
                finish = chunk.choices[0].finish_reason or finish
        assert finish == "length"
        assert server.process.wait(timeout=60) == 0
    finally:
        if server.process.poll() is None:
            server.process.kill()
