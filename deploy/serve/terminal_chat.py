"""`mode: chat`: a multi-turn streaming chat in the terminal, with /reset and /exit."""

from __future__ import annotations

import asyncio
import sys

from deploy.serve.assistant import Assistant

HELP = "Type a message. /reset starts over, /exit (or Ctrl-D) quits."


async def _answer(assistant: Assistant, history: list[dict], out) -> str:
    pieces = []
    async for delta in assistant.astream(history, assistant.params()):
        out.write(delta.text)
        out.flush()
        pieces.append(delta.text)
    out.write("\n")
    return "".join(pieces)


def chat_loop(assistant: Assistant, stdin=None, out=None) -> None:
    stdin, out = stdin or sys.stdin, out or sys.stdout
    history: list[dict] = []
    out.write(f"{assistant.config.title} ({assistant.engine.name}). {HELP}\n")
    loop = asyncio.new_event_loop()
    try:
        while True:
            out.write("you> ")
            out.flush()
            line = stdin.readline()
            if not line:  # end of input
                out.write("\n")
                break
            text = line.strip()
            if not text:
                continue
            if text == "/exit":
                break
            if text == "/reset":
                history.clear()
                out.write("(conversation reset)\n")
                continue
            history.append({"role": "user", "content": text})
            out.write("assistant> ")
            try:
                reply = loop.run_until_complete(_answer(assistant, history, out))
            except ValueError as exc:  # e.g. the conversation outgrew session_len
                history.pop()
                out.write(f"\n[{exc}]\n")
                continue
            history.append({"role": "assistant", "content": reply})
    finally:
        loop.close()
