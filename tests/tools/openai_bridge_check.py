"""Drives hearth-openai with the official openai package, as an existing tool would.

    openai_bridge_check.py --unix SOCKET [--tcp http://127.0.0.1:PORT --token-file FILE]

Run by tests/tests/bridge.rs against hearthd on a private bus. Exits non-zero at the first
broken promise; prints "ok NAME" per check."""

import argparse
import json
import math

import httpx2 as httpx  # the HTTP client openai 3 is built on
import openai

PROMPT = "Write three short sentences about the sea."
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 40}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
]


def unix_client(path: str) -> openai.OpenAI:
    transport = httpx.HTTPTransport(uds=path)
    return openai.OpenAI(base_url="http://hearth/v1", api_key="unused", http_client=httpx.Client(transport=transport),
                         max_retries=0)


def chat(c: openai.OpenAI) -> None:
    whole = c.chat.completions.create(model="", messages=[{"role": "user", "content": PROMPT}], max_tokens=40)
    text = whole.choices[0].message.content
    assert text and whole.choices[0].finish_reason in ("stop", "length"), whole
    assert whole.model == "smollm2-135m-instruct" and whole.usage.completion_tokens > 0, whole
    stream = c.chat.completions.create(model="", messages=[{"role": "user", "content": PROMPT}], max_tokens=40,
                                       stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            pieces.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    assert "".join(pieces) == text, ("".join(pieces), text)
    assert finish == whole.choices[0].finish_reason and usage.total_tokens == whole.usage.total_tokens
    # OpenAI's options reach Hearth: stop ends the text just before it; logprobs come back.
    stop = text.split()[len(text.split()) // 2]
    cut = c.chat.completions.create(model="", messages=[{"role": "user", "content": PROMPT}], max_tokens=40,
                                    stop=[stop])
    assert cut.choices[0].message.content == text[: text.index(stop)], (cut, stop)
    lp = c.chat.completions.create(model="", messages=[{"role": "user", "content": PROMPT}], max_tokens=5,
                                   logprobs=True, top_logprobs=2)
    entries = lp.choices[0].logprobs.content
    assert len(entries) == 5 and all(e.top_logprobs[0].token == e.token for e in entries), entries
    print("ok chat", flush=True)


def tools_and_schemas(c: openai.OpenAI) -> None:
    r = c.chat.completions.create(model="", messages=[{"role": "user", "content": "Weather in Oslo?"}],
                                  tools=TOOLS, tool_choice="required", max_tokens=60)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather", r
    args = json.loads(call.function.arguments)
    assert isinstance(args["city"], str), args
    # The round trip: the call and its result go back, and the model answers in text.
    follow = c.chat.completions.create(model="", max_tokens=30, tools=TOOLS, tool_choice="none", messages=[
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "12 degrees and raining"},
    ])
    assert follow.choices[0].message.content and not follow.choices[0].message.tool_calls, follow
    # Streamed, the call comes as a tool_calls delta.
    calls = [d for ch in c.chat.completions.create(
        model="", messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=TOOLS,
        tool_choice="required", max_tokens=60, stream=True) for d in ch.choices if d.delta.tool_calls]
    assert calls and calls[0].delta.tool_calls[0].function.name == "get_weather", calls
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
              "additionalProperties": False}
    j = c.chat.completions.create(model="", messages=[{"role": "user", "content": "Is water wet?"}], max_tokens=20,
                                  response_format={"type": "json_schema",
                                                   "json_schema": {"name": "a", "schema": schema}})
    assert json.loads(j.choices[0].message.content)["answer"] in ("yes", "no"), j
    print("ok tools_and_schemas", flush=True)


def completions_embeddings_models(c: openai.OpenAI) -> None:
    t = c.completions.create(model="", prompt="Name a colour.", max_tokens=8)
    assert t.choices[0].text and t.object == "text_completion", t
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="", prompt="Name a colour.", max_tokens=8, stream=True))
    assert streamed == t.choices[0].text, (streamed, t)
    # The package asks for base64 and decodes it itself.
    e = c.embeddings.create(model="", input=["the cat sat", "a dog ran"])
    assert len(e.data) == 2 and all(abs(math.sqrt(sum(x * x for x in d.embedding)) - 1) < 1e-3 for d in e.data)
    f = c.embeddings.create(model="", input="the cat sat", encoding_format="float")
    assert max(abs(a - b) for a, b in zip(f.data[0].embedding, e.data[0].embedding)) < 1e-6
    ids = [m.id for m in c.models.list()]
    assert "smollm2-135m-instruct" in ids, ids
    print("ok completions_embeddings_models", flush=True)


def errors(c: openai.OpenAI) -> None:
    for call, cls in [
        (lambda: c.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}]),
         openai.NotFoundError),
        (lambda: c.chat.completions.create(model="", messages=[{"role": "user", "content": "x"}], n=2),
         openai.BadRequestError),
        (lambda: c.chat.completions.create(model="", messages=[{"role": "user", "content": "x"}], temperature=9),
         openai.BadRequestError),
        (lambda: c.chat.completions.create(model="", messages=[{"role": "user", "content": "word " * 20000}]),
         openai.BadRequestError),
    ]:
        try:
            call()
            raise AssertionError(f"{cls.__name__} expected")
        except cls as e:
            assert e.body and e.body.get("message"), e.body
    print("ok errors", flush=True)


def tcp(url: str, token_file: str) -> None:
    token = open(token_file).read().strip()
    good = openai.OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0)
    assert good.chat.completions.create(model="", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="not-the-token", max_retries=0)
    try:
        bad.models.list()
        raise AssertionError("the TCP listener must want its token")
    except openai.AuthenticationError:
        pass
    print("ok tcp", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--unix", required=True)
    ap.add_argument("--tcp")
    ap.add_argument("--token-file")
    a = ap.parse_args()
    c = unix_client(a.unix)
    for check in (chat, tools_and_schemas, completions_embeddings_models, errors):
        check(c)
    if a.tcp:
        tcp(a.tcp, a.token_file)


main()
