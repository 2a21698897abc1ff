"""A job's own chat template, rendered once when the job is created: in a process of its own, with a
time, a memory and an output limit.

A chat template is a program. Two nested ``range(100000)`` loops in a job's ``chat_template`` held
a worker at 100 % CPU past its cancel; ``{{ 'x' * 10**9 }}`` takes a gigabyte in one operation. So
``POST /v1/jobs`` renders the template it was given on a probe conversation (system, user,
assistant, user; with and without the generation prompt) in a child Python, and refuses the job
(422 naming ``params.chat_template``) when the template is longer than ``MAX_TEMPLATE_BYTES``, does
not compile, raises, renders more than ``MAX_OUTPUT_CHARS``, needs more than ``MEMORY_MB`` or has
not finished within ``RENDER_SECONDS`` (the child is killed). The render is transformers' own: the
template is compiled by ``transformers.utils.chat_template_utils`` in the sandboxed Jinja
environment ``apply_chat_template`` uses, and streamed, so the output limit stops it as it grows.

A template may refuse a system message (Gemma's ``raise_exception``): that probe is allowed to
raise, through the template's own ``raise_exception``, and nothing else. A template that passes can
still be slow on some data; a job's render runs in the job's process, which cancel kills
(``workers/ranks.py``).

    python -m models.template_probe    # the child: prints "ready", reads the template (a JSON line), answers
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys

MAX_TEMPLATE_BYTES = 64 * 1024
RENDER_SECONDS = 2.0
MAX_OUTPUT_CHARS = 256 * 1024  # per render of the probe conversation
MEMORY_MB = 256  # address space the child may add while rendering
START_SECONDS = 60.0  # for the child's imports, on a busy host

_SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
_TURNS = [{"role": "user", "content": "Hello, who are you?"},
          {"role": "assistant", "content": "I am an assistant."},
          {"role": "user", "content": "What can you do?"}]
# What tokenizer.apply_chat_template passes besides the messages (the tokenizer's special tokens).
_SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


class TemplateUnusable(ValueError):
    """The template cannot be used; the message says why (it reads after "params.chat_template")."""


def check_template(template: str) -> None:
    """Render ``template`` on the probe conversation in a child process; raise ``TemplateUnusable``
    naming what is wrong (too long, does not compile, raises, too much output, memory or time)."""
    size = len(template.encode("utf-8", "surrogatepass"))
    if size > MAX_TEMPLATE_BYTES:
        raise TemplateUnusable(f"is {size} bytes long; at most {MAX_TEMPLATE_BYTES} (64 KiB)")
    proc = subprocess.Popen([sys.executable, "-m", "models.template_probe"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        if _read_line(proc, START_SECONDS) != "ready":
            raise RuntimeError("the chat template probe did not start")
        proc.stdin.write((json.dumps(template) + "\n").encode())
        proc.stdin.close()
        answer = _read_line(proc, RENDER_SECONDS)
        if answer is None:
            try:
                code = proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                raise TemplateUnusable(f"did not finish rendering a 4-message conversation within {RENDER_SECONDS:g} "
                                      "s") from None
            raise TemplateUnusable(f"crashed the renderer (exit code {code})")
        problem = json.loads(answer)
        if problem:
            raise TemplateUnusable(problem)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _read_line(proc: subprocess.Popen, timeout: float) -> str | None:
    """The child's next line, or None if it has not written one within ``timeout`` (or exited)."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else b""
    return line.decode().strip() if line else None


# --- the child ---------------------------------------------------------------------------------------


class _TooLong(Exception):
    pass


def _render(compiled, messages: list[dict], add_generation_prompt: bool) -> None:
    size = 0
    for piece in compiled.generate(messages=messages, tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt, **_SPECIAL_TOKENS):
        size += len(piece)
        if size > MAX_OUTPUT_CHARS:
            raise _TooLong


def probe(template: str) -> str:
    """What is wrong with ``template`` ("" if nothing), rendered here (in the child)."""
    from jinja2.exceptions import TemplateError, TemplateSyntaxError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        compiled = _compile_jinja_template(template)
    except TemplateSyntaxError as e:
        return f"does not compile: {e.message} (line {e.lineno})"
    except Exception as e:  # noqa: BLE001
        return f"does not compile: {e}"
    for messages, may_refuse in ((_TURNS, False), ([_SYSTEM, *_TURNS], True)):
        for add_generation_prompt in (False, True):
            where = f"a {'system, ' if may_refuse else ''}user, assistant, user conversation" + \
                    (" with the generation prompt" if add_generation_prompt else "")
            try:
                _render(compiled, messages, add_generation_prompt)
            except _TooLong:
                return f"renders more than {MAX_OUTPUT_CHARS} characters for {where}"
            except MemoryError:
                return f"needs more than {MEMORY_MB} MiB to render {where}"
            except TemplateError as e:
                if type(e) is not TemplateError:  # the sandbox's, or an undefined name
                    return f"fails on {where}: {e}"
                if may_refuse:  # the template's own raise_exception, on a system message
                    break
                return f"raises on {where}: {e}"
            except Exception as e:  # noqa: BLE001 — whatever the template did, it is the answer
                return f"fails on {where}: {type(e).__name__}: {e}"
    return ""


def main() -> int:
    import resource

    import transformers.utils.chat_template_utils  # noqa: F401 — imported before the limit

    with open("/proc/self/status") as f:
        used = int(next(line for line in f if line.startswith("VmSize:")).split()[1]) * 1024
    limit = used + MEMORY_MB * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    print("ready", flush=True)
    template = json.loads(sys.stdin.readline())
    print(json.dumps(probe(template)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
