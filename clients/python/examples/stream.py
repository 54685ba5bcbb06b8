"""Streams an answer from hearthd: python stream.py "Why is the sky blue?" [--bus-address ADDR]"""

import argparse
import asyncio

import hearth


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("prompt")
    ap.add_argument("--bus-address", help="a bus other than the system bus")
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    async with await hearth.connect(args.bus_address) as client:
        try:
            generation = await client.generate(args.prompt, max_tokens=args.max_tokens)
            async for token in generation:
                print(token.text, end="", flush=True)
            print()
            r = generation.result
            print(f"[{r['finish_reason']}: {r['tokens']} tokens on {r['model']}, {r['route']}]")
        except hearth.ModelUnavailable as e:
            print(f"the model cannot serve now: {e.message}")
        except hearth.HearthError as e:
            print(f"refused: {e.name}: {e.message}")


asyncio.run(main())
