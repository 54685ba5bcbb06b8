"""A conversation in a session: each line on stdin is a turn. python chat.py [--bus-address ADDR]"""

import argparse
import asyncio
import sys

import hearth


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bus-address")
    args = ap.parse_args()
    async with await hearth.connect(args.bus_address) as client:
        async with await client.open_session() as session:
            for line in sys.stdin:
                if not line.strip():
                    continue
                async for token in await session.generate(line.strip(), max_tokens=96):
                    print(token.text, end="", flush=True)
                print(f"\n[{await session.tokens()} tokens in the session]")


asyncio.run(main())
