"""Hearth's Python client: asyncio, on dbus-fast.

    import asyncio, hearth

    async def main():
        async with await hearth.connect() as client:
            async for token in await client.generate("Why is the sky blue?", max_tokens=64):
                print(token.text, end="", flush=True)

    asyncio.run(main())
"""

from .client import Client, Generation, Session, Token, connect, message_dict, plain, request_dict, request_path
from .errors import (
    Busy,
    BusError,
    Cancelled,
    CloudUnavailable,
    ContextLengthExceeded,
    EngineFailed,
    HearthError,
    Internal,
    InvalidArgs,
    ModelNotFound,
    ModelUnavailable,
    NotAuthorized,
    PrivacyViolation,
)

__all__ = [
    "Busy",
    "BusError",
    "Cancelled",
    "Client",
    "CloudUnavailable",
    "ContextLengthExceeded",
    "EngineFailed",
    "Generation",
    "HearthError",
    "Internal",
    "InvalidArgs",
    "ModelNotFound",
    "ModelUnavailable",
    "NotAuthorized",
    "PrivacyViolation",
    "Session",
    "Token",
    "connect",
    "message_dict",
    "plain",
    "request_dict",
    "request_path",
]
