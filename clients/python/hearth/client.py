"""An asyncio client of org.hearth.Hearth1, written from dbus/data/org.hearth.Hearth1.xml.

Requests are plain Python dictionaries with the XML's keys; this module gives each key its
D-Bus type (a{sv} needs one per value), so `max_tokens=64` goes as `u` and `stop=["\\n"]` as
`as`. Results come back as plain dictionaries (the XML's result keys)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
from typing import Any, AsyncIterator, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from .errors import BusError, HearthError, from_name

BUS_NAME = "org.hearth.Hearth1"
# The bus's error name for a name nobody owns: hearthd left the bus.
NO_OWNER = "org.freedesktop.DBus.Error.NameHasNoOwner"
OBJECT_PATH = "/org/hearth/Hearth1"
INTERFACE = "org.hearth.Hearth1"
SESSION_INTERFACE = "org.hearth.Hearth1.Session"
REQUEST_INTERFACE = "org.hearth.Hearth1.Request"
REQUEST_PATH_PREFIX = "/org/hearth/Hearth1/request"

# The D-Bus type of each request key (the XML's request dictionary).
REQUEST_TYPES = {
    "messages": "aa{sv}",
    "model": "s",
    "max_tokens": "u",
    "temperature": "d",
    "top_p": "d",
    "top_k": "u",
    "seed": "u",
    "handle_token": "s",
    "priority": "s",
    "deadline_ms": "u",
    "route": "s",
    "json_schema": "s",
    "grammar": "s",
    "tools": "s",
    "tool_choice": "s",
    "adapters": "a{sd}",
    "speculative": "b",
    "stop": "as",
    "repetition_penalty": "d",
    "frequency_penalty": "d",
    "presence_penalty": "d",
    "logprobs": "b",
    "top_logprobs": "u",
    # Embed's.
    "texts": "as",
    "scope": "s",
    # The task calls'.
    "text": "s",
    "sealed": "ay",
    "image": "ay",
    "sealed_image": "ay",
    "question": "s",
    "format": "s",
    "length": "s",
    "tone": "s",
}

# The D-Bus type of each key of one message.
MESSAGE_TYPES = {
    "role": "s",
    "content": "s",
    "sealed": "ay",
    "scope": "s",
    "images": "aay",
    "sealed_images": "aay",
    "tool_call_id": "s",
    # An assistant message's calls, as a result's tool_calls gave them.
    "tool_calls": "aa{sv}",
}

Messages = Union[str, Sequence[Dict[str, Any]]]


def _guess(value: Any) -> str:
    """The D-Bus type of a value of a key this client does not know (a newer hearthd's)."""
    if isinstance(value, bool):
        return "b"
    if isinstance(value, int):
        return "x" if value < 0 else "t"
    if isinstance(value, float):
        return "d"
    if isinstance(value, (bytes, bytearray)):
        return "ay"
    if isinstance(value, str):
        return "s"
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return "as"
    raise TypeError(f"cannot tell the D-Bus type of {type(value).__name__}; give a dbus_fast.Variant")


def _variant(key: str, value: Any, types: Dict[str, str]) -> Variant:
    if isinstance(value, Variant):
        return value
    sig = types.get(key) or _guess(value)
    if key == "tool_calls":
        value = [_call_dict(c) for c in value]
    elif sig == "aa{sv}":
        value = [message_dict(m) for m in value]
    elif sig == "a{sd}":
        value = {str(k): float(v) for k, v in value.items()}
    elif sig == "d":
        value = float(value)
    elif sig == "aay":
        value = [bytes(v) for v in value]
    elif sig == "ay":
        value = bytes(value)
    elif key in ("tools", "json_schema") and not isinstance(value, str):
        value = json.dumps(value)
    return Variant(sig, value)


def _call_dict(call: Dict[str, Any]) -> Dict[str, Variant]:
    """One tool call (id, name, arguments: JSON text or a dict) as an a{sv}."""
    args = call.get("arguments", "{}")
    if not isinstance(args, str):
        args = json.dumps(args)
    return {"id": Variant("s", call["id"]), "name": Variant("s", call["name"]), "arguments": Variant("s", args)}


def message_dict(message: Dict[str, Any]) -> Dict[str, Variant]:
    """One message (role, content, scope, sealed, images, ...) as an a{sv}."""
    return {k: _variant(k, v, MESSAGE_TYPES) for k, v in message.items()}


def request_dict(request: Dict[str, Any]) -> Dict[str, Variant]:
    """A request dictionary as an a{sv}; `messages` may be a string (one user message)."""
    out = {}
    for k, v in request.items():
        if v is None:
            continue
        if k == "messages" and isinstance(v, str):
            v = [{"role": "user", "content": v}]
        out[k] = _variant(k, v, REQUEST_TYPES)
    return out


def plain(value: Any) -> Any:
    """A D-Bus value with every Variant unwrapped (results as plain dictionaries)."""
    if isinstance(value, Variant):
        return plain(value.value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def request_path(unique_name: str, handle_token: str) -> str:
    """The request object path hearthd gives a request with `handle_token` (see the XML)."""
    if not re.fullmatch(r"[A-Za-z0-9_]{1,64}", handle_token):
        raise ValueError("handle_token must be 1-64 ASCII letters, digits or '_'")
    sender = re.sub(r"[^A-Za-z0-9]", "_", unique_name.lstrip(":"))
    return f"{REQUEST_PATH_PREFIX}/{sender}_{handle_token}"


class Token(Tuple[int, int, str]):
    """One streamed token: its index, token id (-1 for cloud text) and text piece."""

    __slots__ = ()

    def __new__(cls, index: int, token_id: int, text: str) -> "Token":
        return super().__new__(cls, (index, token_id, text))

    @property
    def index(self) -> int:
        return self[0]

    @property
    def token_id(self) -> int:
        return self[1]

    @property
    def text(self) -> str:
        return self[2]


_tokens = itertools.count()


def _handle_token() -> str:
    return f"py{os.getpid()}_{next(_tokens)}"


class Generation:
    """A running generation: iterate it for its tokens (`async for t in g`); after the last,
    `result` is the Finished dictionary. A generation that failed raises its typed error at
    the end of the iteration (with the result, partial text included, on the exception)."""

    def __init__(self, client: "Client", path: str, owner: str):
        self._client = client
        self.path = path
        self._owner = owner
        self._rule = f"type='signal',sender='{owner}',path='{path}',interface='{REQUEST_INTERFACE}'"
        # None: hearthd left the bus.
        self._queue: "asyncio.Queue[Optional[Message]]" = asyncio.Queue()
        self.result: Optional[Dict[str, Any]] = None
        self.migrations: List[Tuple[str, str, int]] = []
        self._done = False

    def _on_message(self, msg: Message) -> None:
        # Only the service's own signals on this request's path: another client cannot
        # forge a token by sending a signal with the same path.
        if (
            msg.message_type == MessageType.SIGNAL
            and msg.path == self.path
            and msg.interface == REQUEST_INTERFACE
            and msg.sender == self._owner
        ):
            self._queue.put_nowait(msg)

    def _lost(self) -> None:
        """hearthd left the bus: no Finished will come."""
        self._queue.put_nowait(None)

    def __aiter__(self) -> AsyncIterator[Token]:
        return self._events()

    async def _events(self) -> AsyncIterator[Token]:
        while not self._done:
            msg = await self._queue.get()
            if msg is None:
                self._done = True
                self._client._unwatch(self)
                raise BusError(NO_OWNER, "hearthd left the bus before the generation finished")
            if msg.member == "Token":
                index, token_id, text = msg.body
                yield Token(index, token_id, text)
            elif msg.member == "Migrated":
                self.migrations.append(tuple(msg.body))
            elif msg.member == "Finished":
                self._finish(plain(msg.body[0]))
        if self.result and self.result.get("error_name"):
            raise from_name(self.result["error_name"], self.result.get("error_message", ""), self.result)

    def _finish(self, result: Dict[str, Any]) -> None:
        self.result = result
        self._done = True
        self._client._unwatch(self)

    async def text(self) -> str:
        """Waits for the end and returns the whole text."""
        async for _ in self:
            pass
        assert self.result is not None
        return self.result["text"]

    async def cancel(self) -> None:
        """Asks hearthd to stop; the iteration then ends with Cancelled."""
        await self._client._call(self.path, REQUEST_INTERFACE, "Cancel", "", [])


class Session:
    """A multi-turn session: hearthd keeps the transcript and its KV cache between turns."""

    def __init__(self, client: "Client", path: str):
        self._client = client
        self.path = path

    async def generate(self, messages: Messages, **options: Any) -> Generation:
        """The next turn (its new messages), streamed."""
        return await self._client._start(self.path, SESSION_INTERFACE, {"messages": messages, **options})

    async def complete(self, messages: Messages, **options: Any) -> Dict[str, Any]:
        """The next turn, whole."""
        body = [request_dict({"messages": messages, **options})]
        return plain((await self._client._call(self.path, SESSION_INTERFACE, "Complete", "a{sv}", body))[0])

    async def tokens(self) -> int:
        """Tokens the session's context holds so far."""
        return await self._client._get(self.path, SESSION_INTERFACE, "Tokens")

    async def close(self) -> None:
        await self._client._call(self.path, SESSION_INTERFACE, "Close", "", [])

    async def __aenter__(self) -> "Session":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class Client:
    """A connection to hearthd. Use `await connect()`, or `async with await connect() as c`."""

    def __init__(self, bus: MessageBus):
        self.bus = bus
        self._watching: Dict[str, Generation] = {}
        self._owner: Optional[str] = None
        self._watching_owner = False
        bus.add_message_handler(self._dispatch)

    def _dispatch(self, msg: Message) -> None:
        if (
            msg.message_type == MessageType.SIGNAL
            and msg.sender == "org.freedesktop.DBus"
            and msg.member == "NameOwnerChanged"
            and msg.body
            and msg.body[0] == BUS_NAME
        ):
            for g in list(self._watching.values()):
                if g._owner == msg.body[1]:
                    g._lost()
            return
        g = self._watching.get(msg.path or "")
        if g is not None:
            g._on_message(msg)

    def _unwatch(self, g: Generation) -> None:
        """Stops watching `g`: its entry (only if it is still `g`'s) and its match rule (the
        bus allows a connection a bounded number of them)."""
        if self._watching.get(g.path) is g:
            del self._watching[g.path]
        if self.bus.connected:
            asyncio.ensure_future(self._remove_match(g._rule))

    async def _remove_match(self, rule: str) -> None:
        try:
            await self._bus_call("RemoveMatch", "s", [rule])
        except Exception:  # the connection is going away: its rules go with it
            pass

    async def _call(self, path: str, interface: str, member: str, signature: str, body: List[Any],
                    destination: str = BUS_NAME) -> List[Any]:
        reply = await self.bus.call(
            Message(destination=destination, path=path, interface=interface, member=member,
                    signature=signature, body=body)
        )
        if reply.message_type == MessageType.ERROR:
            raise from_name(reply.error_name or "", reply.body[0] if reply.body else "")
        return reply.body

    async def _get(self, path: str, interface: str, prop: str) -> Any:
        body = await self._call(path, "org.freedesktop.DBus.Properties", "Get", "ss", [interface, prop])
        return plain(body[0])

    async def _bus_call(self, member: str, signature: str, body: List[Any]) -> List[Any]:
        return await self._call("/org/freedesktop/DBus", "org.freedesktop.DBus", member, signature, body,
                                destination="org.freedesktop.DBus")

    async def _service_owner(self) -> str:
        """The unique name that owns org.hearth.Hearth1 (signals carry it as their sender)."""
        return (await self._bus_call("GetNameOwner", "s", [BUS_NAME]))[0]

    async def _watch_owner(self) -> None:
        """Hears when hearthd leaves the bus (stops, crashes, restarts): its generations then
        end with BusError, rather than wait for a Finished that will not come."""
        if not self._watching_owner:
            rule = ("type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
                    f"member='NameOwnerChanged',arg0='{BUS_NAME}'")
            await self._bus_call("AddMatch", "s", [rule])
            self._watching_owner = True

    async def _start(self, path: str, interface: str, request: Dict[str, Any]) -> Generation:
        await self._watch_owner()
        token = request.pop("handle_token", None) or _handle_token()
        expected = request_path(self.bus.unique_name, token)
        owner = await self._service_owner()
        # Watching (and matching) before the call: the first tokens may come before its reply.
        if expected in self._watching:
            raise ValueError(f"handle_token {token!r} is in use by a running generation of this client")
        g = Generation(self, expected, owner)
        self._watching[expected] = g
        try:
            await self._bus_call("AddMatch", "s", [g._rule])
        except BaseException:
            self._watching.pop(expected, None)
            raise
        try:
            body = [request_dict({**request, "handle_token": token})]
            returned = (await self._call(path, interface, "Generate", "a{sv}", body))[0]
        except BaseException:
            self._unwatch(g)
            raise
        if returned != expected:
            self._unwatch(g)
            raise HearthError("org.hearth.Hearth1.Error.Internal", f"hearthd returned {returned}, not {expected}")
        # A hearthd that left before the match was in place was never watched: the call went
        # to its successor, whose signals the match does not take.
        if await self._service_owner() != owner:
            self._unwatch(g)
            raise BusError(NO_OWNER, "hearthd restarted while the generation was being started; try again")
        return g

    async def generate(self, messages: Messages, **options: Any) -> Generation:
        """Starts a generation and returns it to iterate: `messages` is a user message's text
        or a list of message dictionaries; `options` are the XML's request keys."""
        return await self._start(OBJECT_PATH, INTERFACE, {"messages": messages, **options})

    async def complete(self, messages: Messages, **options: Any) -> Dict[str, Any]:
        """Generates and returns the result dictionary (text, finish_reason, ...). A
        generation that fails raises its typed error; one cut by a deadline, Cancelled."""
        body = [request_dict({"messages": messages, **options})]
        return plain((await self._call(OBJECT_PATH, INTERFACE, "Complete", "a{sv}", body))[0])

    async def embed(self, texts: Iterable[str], model: Optional[str] = None,
                    scope: Optional[str] = None) -> List[List[float]]:
        """Unit-length embeddings of `texts`, computed on the device."""
        body = [request_dict({"texts": list(texts), "model": model, "scope": scope})]
        return (await self._call(OBJECT_PATH, INTERFACE, "Embed", "a{sv}", body))[0]

    async def _task(self, member: str, request: Dict[str, Any]) -> Dict[str, Any]:
        body = [request_dict(request)]
        return plain((await self._call(OBJECT_PATH, INTERFACE, member, "a{sv}", body))[0])

    async def summarize(self, text: str, **options: Any) -> Dict[str, Any]:
        """A summary (format: paragraph, bullets, headline; length: short, medium, long)."""
        return await self._task("Summarize", {"text": text, **options})

    async def rewrite(self, text: str, **options: Any) -> Dict[str, Any]:
        """The text rewritten (tone: neutral, formal, casual, friendly; length: same, shorter, longer)."""
        return await self._task("Rewrite", {"text": text, **options})

    async def proofread(self, text: str, **options: Any) -> Dict[str, Any]:
        """The text with its spelling, grammar and punctuation corrected."""
        return await self._task("Proofread", {"text": text, **options})

    async def describe(self, image: bytes, **options: Any) -> Dict[str, Any]:
        """A description of a PNG or JPEG image (vision models; question: what to describe)."""
        return await self._task("Describe", {"image": bytes(image), **options})

    async def count_tokens(self, messages: Messages, **options: Any) -> Dict[str, Any]:
        """What a request would take of its model's context (prompt_tokens, remaining, fits)."""
        body = [request_dict({"messages": messages, **options})]
        return plain((await self._call(OBJECT_PATH, INTERFACE, "CountTokens", "a{sv}", body))[0])

    async def availability(self, model: str = "") -> Dict[str, Any]:
        """Whether a model ("" for the default) can serve this app now (state, reason)."""
        return plain((await self._call(OBJECT_PATH, INTERFACE, "Availability", "s", [model]))[0])

    async def open_session(self, model: Optional[str] = None) -> Session:
        body = [request_dict({"model": model})]
        return Session(self, (await self._call(OBJECT_PATH, INTERFACE, "OpenSession", "a{sv}", body))[0])

    async def seal(self, data: Union[bytes, str]) -> bytes:
        """Encrypts data (text or an image) for this app with the device key; the blob goes in
        a message's `sealed` (or `sealed_images`), and stays on the device."""
        raw = data.encode() if isinstance(data, str) else bytes(data)
        return bytes((await self._call(OBJECT_PATH, INTERFACE, "Seal", "aya{sv}", [raw, {}]))[0])

    async def list_models(self) -> List[Dict[str, Any]]:
        return plain((await self._call(OBJECT_PATH, INTERFACE, "ListModels", "", []))[0])

    async def caller_info(self) -> Dict[str, Any]:
        """Who hearthd takes this program to be, and its policy."""
        return plain((await self._call(OBJECT_PATH, INTERFACE, "CallerInfo", "", []))[0])

    async def get(self, prop: str) -> Any:
        """A property of the service (Version, LoadedModels, QueueDepth, CloudAvailable, ...)."""
        return await self._get(OBJECT_PATH, INTERFACE, prop)

    def close(self) -> None:
        self.bus.disconnect()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()


async def connect(bus_address: Optional[str] = None) -> Client:
    """Connects to hearthd: on the system bus, or the bus at `bus_address` (or
    $HEARTH_BUS_ADDRESS)."""
    address = bus_address or os.environ.get("HEARTH_BUS_ADDRESS")
    bus = MessageBus(bus_address=address) if address else MessageBus(bus_type=BusType.SYSTEM)
    return Client(await bus.connect())


__all__ = ["Client", "Generation", "Session", "Token", "connect"]
