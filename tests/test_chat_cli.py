"""`mistral-nemo chat` driven through a pseudo-terminal, as a person would use it."""

from __future__ import annotations

import contextlib
import os
import pty
import select
import signal
import sys
import time

import pytest


class Terminal:
    def __init__(self, argv: list[str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal
            # As in a person's shell, Ctrl-C interrupts (a test run started in the
            # background has SIGINT ignored, which exec would pass on).
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.execv(sys.executable, [sys.executable, "-m", "mistral_nemo.cli", *argv])
        self.buffer = ""

    def read_until(self, marker: str, timeout: float = 60) -> str:
        end = time.time() + timeout
        while marker not in self.buffer:
            if time.time() > end:
                raise TimeoutError(f"no {marker!r} in {self.buffer[-500:]!r}")
            ready, _, _ = select.select([self.fd], [], [], 0.1)
            if ready:
                try:
                    self.buffer += os.read(self.fd, 4096).decode(errors="replace")
                except OSError:
                    break
        head, _, self.buffer = self.buffer.partition(marker)
        return head

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def close(self) -> int:
        for _ in range(100):
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.1)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        return -9


@pytest.fixture
def term(tiny_mistral):
    t = Terminal(
        [
            "chat",
            str(tiny_mistral),
            "--max-tokens",
            "3000",
            "--temperature",
            "0",
            "--kv-cache-memory",
            "64MiB",
        ]
    )
    yield t
    with contextlib.suppress(ProcessLookupError, ChildProcessError):
        os.kill(t.pid, signal.SIGKILL)
        os.waitpid(t.pid, 0)


def test_chat_session(term):
    term.read_until("commands:")
    term.read_until("> ")
    # Ctrl-C stops a long answer without quitting.
    term.send("Write a very long story\n")
    term.read_until("Write a very long story")
    time.sleep(1.0)
    term.send("\x03")
    term.read_until("[stopped]")
    term.read_until("> ")
    term.send("/system You answer in French.\n")
    assert "system prompt set" in term.read_until("> ")
    term.send("/reset\n")
    assert "conversation reset" in term.read_until("> ")
    term.send("/help\n")
    assert "/reset" in term.read_until("> ")
    term.send("/exit\n")
    assert term.close() == 0


def test_history_is_kept_between_turns(tiny_mistral):
    from io import StringIO

    from mistral_nemo.chat import run_chat
    from mistral_nemo.engine import LLM, SamplingParams

    llm = LLM(tiny_mistral, kv_cache_memory="16MiB")
    seen = []
    real = llm.tokenizer.encode_chat

    def spy(messages, *a, **k):
        seen.append([m["role"] for m in messages])
        return real(messages, *a, **k)

    llm.tokenizer.encode_chat = spy
    stdin = StringIO("Hello\nAgain\n/reset\nFresh\n")
    run_chat(llm, SamplingParams(temperature=0, max_tokens=3), "Be brief.", stdin, StringIO())
    assert seen == [["system", "user"], ["system", "user", "assistant", "user"], ["system", "user"]]
