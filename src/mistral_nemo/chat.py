"""`mistral-nemo chat`: a conversation in the terminal, streamed as it is generated.

Commands: /reset forgets the conversation, /system TEXT sets the system prompt (and
resets), /exit quits (as does Ctrl-D). Ctrl-C stops the answer being written and keeps what
was said so far; the conversation goes on.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any, TextIO

from mistral_nemo.engine import LLM, SamplingParams
from mistral_nemo.errors import MistralNemoError

HELP = "commands: /reset, /system TEXT, /exit (Ctrl-C stops an answer, Ctrl-D quits)"


def run_chat(
    llm: LLM,
    params: SamplingParams,
    system: str | None = None,
    stdin: TextIO = sys.stdin,
    stdout: TextIO = sys.stdout,
) -> None:
    assert llm.tokenizer is not None
    history: list[dict[str, Any]] = []
    print(HELP, file=stdout, flush=True)
    while True:
        try:
            print("> ", end="", file=stdout, flush=True)
            line = stdin.readline()
        except KeyboardInterrupt:
            print(file=stdout)
            continue
        if not line:  # Ctrl-D
            print(file=stdout)
            return
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            return
        if line == "/reset":
            history.clear()
            print("(conversation reset)", file=stdout, flush=True)
            continue
        if line.startswith("/system"):
            system = line.removeprefix("/system").strip() or None
            history.clear()
            print(
                f"(system prompt {'set' if system else 'cleared'}; conversation reset)",
                file=stdout,
                flush=True,
            )
            continue
        if line.startswith("/"):
            print(HELP, file=stdout, flush=True)
            continue
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        try:
            prompt = llm.tokenizer.encode_chat(messages)
            answer = _stream_answer(llm, prompt, params, stdout)
        except MistralNemoError as e:
            history.pop()
            print(f"error: {e}", file=stdout, flush=True)
            continue
        history.append({"role": "assistant", "content": answer or " "})


def _stream_answer(llm: LLM, prompt: list[int], params: SamplingParams, out: TextIO) -> str:
    text = ""
    stream = llm.stream(prompt, replace(params))
    try:
        for chunk in stream:
            piece = chunk.outputs[0].delta
            text += piece
            print(piece, end="", file=out, flush=True)
    except KeyboardInterrupt:
        stream.close()  # aborts the request and frees its blocks
        print(" [stopped]", end="", file=out)
    print(file=out, flush=True)
    return text
