"""The Python client against a running hearthd (tests/tests/clients.rs starts one on a
private bus): python live.py --bus-address ADDR. Exits non-zero at the first broken promise."""

import argparse
import asyncio
import json
import math
import os
import signal

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

import hearth

PROMPT = "Write three short sentences about the sea."


async def streams_and_completes(client: hearth.Client) -> None:
    g = await client.generate(PROMPT, max_tokens=40)
    tokens = [t async for t in g]
    r = g.result
    assert [t.index for t in tokens] == list(range(len(tokens))), tokens
    assert "".join(t.text for t in tokens) == r["text"] and r["text"], r
    assert r["finish_reason"] in ("stop", "length") and r["route"] == "local", r
    assert r["token_ids"] == [t.token_id for t in tokens]
    # Greedy: the same request gives the same text, whole.
    whole = await client.complete(PROMPT, max_tokens=40)
    assert whole["text"] == r["text"], (whole, r)
    assert await (await client.generate(PROMPT, max_tokens=40)).text() == r["text"]
    # A handle token in use is refused here, and the generation using it is not disturbed.
    first = await client.generate(PROMPT, max_tokens=8, handle_token="dup")
    try:
        await client.generate(PROMPT, max_tokens=8, handle_token="dup")
        raise AssertionError("a handle token in use must be refused")
    except ValueError:
        pass
    assert await first.text()
    # Options get their D-Bus types from the client: a list of strings, floats, booleans.
    words = r["text"].split()
    stop = words[len(words) // 2]
    cut = await client.complete(PROMPT, max_tokens=40, stop=[stop], frequency_penalty=0.0, speculative=False)
    assert cut["text"] == r["text"][: r["text"].index(stop)], (cut, stop)
    lp = await client.complete(PROMPT, max_tokens=5, logprobs=True, top_logprobs=2)
    assert [e[0] for e in lp["logprobs"]] == lp["token_ids"] and all(e[3][0][0] == e[0] for e in lp["logprobs"])
    # Messages as dictionaries, with a system message.
    sys_r = await client.complete(
        [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Colour of grass?"}],
        max_tokens=8,
    )
    assert sys_r["text"] and sys_r["prompt_tokens"] != r["prompt_tokens"], sys_r


async def embeds_seals_and_counts(client: hearth.Client) -> None:
    vectors = await client.embed(["the cat sat", "a dog ran"])
    assert len(vectors) == 2 and all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-3 for v in vectors)
    blob = await client.seal("My door code is 4711.")
    assert isinstance(blob, bytes) and b"4711" not in blob
    r = await client.complete([{"role": "user", "sealed": blob}], max_tokens=8)
    assert r["route"] == "local", r
    s = await client.summarize("The council approved new bicycle lanes on Main Street.", format="bullets",
                               max_tokens=24)
    assert s["text"] and s["route"] == "local", s
    count = await client.count_tokens(PROMPT, max_tokens=40)
    assert count["fits"] and count["prompt_tokens"] == (await client.complete(PROMPT, max_tokens=1))["prompt_tokens"]
    a = await client.availability()
    assert a["state"] == "ready" and "chat" in a["capabilities"], a
    assert (await client.availability("no-such-model"))["state"] == "not-installed"
    models = await client.list_models()
    assert any(m["name"] == a["model"] and m["loaded"] for m in models), models
    assert (await client.caller_info())["app_id"]
    assert isinstance(await client.get("Version"), str)


WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                           "required": ["city"]}}}]


async def tool_round_trip(client: hearth.Client) -> None:
    q = "What is the weather in Oslo?"
    r = await client.complete(q, tools=WEATHER, tool_choice="required", max_tokens=64)
    assert r["finish_reason"] == "tool_calls" and r["tool_calls"][0]["name"] == "get_weather", r
    # The calls go back as the assistant's tool_calls (arguments as text or as a dict), the
    # results as tool messages with their call's id.
    calls = [dict(c, arguments=json.loads(c["arguments"])) for c in r["tool_calls"]]
    history = [{"role": "user", "content": q}, {"role": "assistant", "tool_calls": calls}]
    history += [{"role": "tool", "tool_call_id": c["id"], "content": "-3 C, snow"} for c in calls]
    answer = await client.complete(history, tools=WEATHER, tool_choice="none", max_tokens=24)
    assert answer["text"] and answer["finish_reason"] != "tool_calls", answer
    assert answer["prompt_tokens"] > r["prompt_tokens"], (answer, r)


async def sessions(client: hearth.Client) -> None:
    async with await client.open_session() as s:
        first = await s.complete("My name is Ada. Say hello.", max_tokens=16)
        n = await s.tokens()
        assert n >= first["prompt_tokens"], (n, first)
        turn = await s.generate("What is my name?", max_tokens=16)
        text = "".join([t.text async for t in turn])
        assert text == turn.result["text"] and turn.result["cached_tokens"] > 0, turn.result
        assert await s.tokens() > n
    try:
        await s.tokens()
        raise AssertionError("a closed session still answers")
    except hearth.HearthError:
        pass


async def typed_errors(client: hearth.Client) -> None:
    for call, cls in [
        (client.complete(PROMPT, bogus_key="x"), hearth.InvalidArgs),
        (client.complete(PROMPT, max_tokens=0), hearth.InvalidArgs),
        (client.complete(PROMPT, model="no-such-model"), hearth.ModelNotFound),
        (client.complete("word " * 100000, max_tokens=4), hearth.ContextLengthExceeded),
        (client.generate(PROMPT, stop=[""]), hearth.InvalidArgs),
    ]:
        try:
            await call
            raise AssertionError(f"{cls.__name__} expected")
        except cls as e:
            assert e.name == "org.hearth.Hearth1.Error." + cls.__name__ and e.message, e
    # Still serving.
    assert (await client.complete("Hi", max_tokens=2))["text"] is not None


async def cancels_and_ignores_forgeries(client: hearth.Client, address: str) -> None:
    g = await client.generate("Count from one to five hundred, in words.", max_tokens=400)
    forger = await MessageBus(bus_address=address).connect()
    forged = Message(
        message_type=MessageType.SIGNAL,
        destination=client.bus.unique_name,
        path=g.path,
        interface="org.hearth.Hearth1.Request",
        member="Token",
        signature="uis",
        body=[0, 1, "FORGED"],
    )
    texts = []
    try:
        async for t in g:
            texts.append(t.text)
            if len(texts) == 1:
                await forger.send(forged)
            if len(texts) == 5:
                await g.cancel()
        raise AssertionError("a cancelled generation must end with Cancelled")
    except hearth.Cancelled as e:
        assert e.result["finish_reason"] == "cancelled" and len(texts) < 400, e.result
        assert e.result["text"] == "".join(texts)
    assert not any("FORGED" in t for t in texts), texts
    forger.disconnect()


async def service_lost(client: hearth.Client, pid: int) -> None:
    """hearthd dies mid-generation: the iteration ends with BusError, not a wait forever."""
    g = await client.generate("Count from one to five hundred, in words.", max_tokens=400)
    got = 0
    try:
        async for _ in g:
            got += 1
            if got == 1:
                os.kill(pid, signal.SIGKILL)
        raise AssertionError("a generation whose service died must not end normally")
    except hearth.BusError as e:
        assert e.name == "org.freedesktop.DBus.Error.NameHasNoOwner" and got < 400, (e, got)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bus-address", required=True)
    ap.add_argument("--kill-pid", type=int, help="only check that killing this hearthd ends a generation")
    args = ap.parse_args()
    address = args.bus_address
    if args.kill_pid:
        async with await hearth.connect(address) as client:
            await asyncio.wait_for(service_lost(client, args.kill_pid), 30)
            print("ok service_lost", flush=True)
        return
    async with await hearth.connect(address) as client:
        for check in (streams_and_completes, embeds_seals_and_counts, tool_round_trip, sessions, typed_errors):
            await check(client)
            print("ok", check.__name__, flush=True)
        await cancels_and_ignores_forgeries(client, address)
        print("ok cancels_and_ignores_forgeries", flush=True)


asyncio.run(main())
