"""Bodies are bounded while they stream, and a request without a valid key never has its body read.
The real app under a real uvicorn server (in a thread, on a real SQLite database), spoken to over a
raw socket that sends the body only while the server has not answered: how much of it was sent by
the time the answer came is what the server read at most (plus the kernel's socket buffers)."""

from __future__ import annotations

import json
import select
import socket
import time

import pytest

MB = 1024 * 1024


@pytest.fixture
def server(request, monkeypatch, keys):
    """``BEAVER_MAX_UPLOAD_MB=2`` (and the default 1 MB body limit elsewhere) on a live uvicorn."""
    from api.settings import get_settings

    monkeypatch.setenv("BEAVER_MAX_UPLOAD_MB", "2")
    get_settings.cache_clear()
    return request.getfixturevalue("live_server")


def head(method: str, path: str, headers: dict) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunked(pieces):
    """Transfer-Encoding: chunked framing of ``pieces`` (no Content-Length: the server must count)."""
    for piece in pieces:
        yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    yield b"0\r\n\r\n"


def exchange(port: int, request_head: bytes, body, wait_first: float = 0.0,
             timeout: float = 30) -> tuple[int, dict, int]:
    """Send the head, then ``body`` chunks only while no answer has come; return (status, the JSON
    answer, body bytes sent). ``wait_first``: give the server that long to answer before any body byte."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(request_head)
    sock.setblocking(False)
    sent, answer = 0, b""
    deadline = time.time() + timeout

    def answered(wait: float) -> bool:
        return bool(select.select([sock], [], [], wait)[0])

    try:
        if not (wait_first and answered(wait_first)):
            for chunk in body:
                view = memoryview(chunk)
                while view:
                    readable, writable, _ = select.select([sock], [sock], [], 5)
                    if readable:
                        raise StopIteration
                    assert time.time() < deadline, f"no answer after sending {sent} bytes"
                    if writable:
                        n = sock.send(view)
                        view, sent = view[n:], sent + n
    except (StopIteration, BrokenPipeError, ConnectionResetError):
        pass
    sock.setblocking(True)
    sock.settimeout(timeout)
    try:
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _length(answer):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    status_line, _, rest = answer.partition(b"\r\n")
    payload = rest.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in rest else b""
    return int(status_line.split()[1]), json.loads(payload or b"{}"), sent


def _length(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 62


def filler(total: int, piece: int = 64 * 1024):
    line = (json.dumps({"prompt": "how do i make a cake ? " * 4}) + "\n").encode()
    block = line * (piece // len(line))
    for _ in range(total // len(block)):
        yield block


def test_a_chunked_multipart_upload_past_the_limit_is_413_before_it_is_read(server, keys):
    """90 MB of multipart JSONL, chunked, against BEAVER_MAX_UPLOAD_MB=2: the whole form counts."""
    boundary = "beaverboundary"
    preamble = (f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nbig\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="kind"\r\n\r\nprompt\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
                "Content-Type: application/jsonl\r\n\r\n").encode()
    pieces = [preamble, *filler(90 * MB), f"\r\n--{boundary}--\r\n".encode()]
    request = head("POST", "/v1/datasets", {"Authorization": f"Bearer {keys['admin']}",
                                             "Content-Type": f"multipart/form-data; boundary={boundary}",
                                             "Transfer-Encoding": "chunked"})
    status, answer, sent = exchange(server, request, chunked(pieces))
    assert status == 413 and answer["error"]["code"] == "payload_too_large", answer
    assert "BEAVER_MAX_UPLOAD_MB" in answer["error"]["message"]
    assert sent < 30 * MB, f"{sent} bytes of 90 MB went out before the 413"
    # A big non-file part counts too: the limit is the whole request, not the file.
    pieces = [f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\n'.encode(), *filler(10 * MB)]
    status, answer, sent = exchange(server, request, chunked(pieces))
    assert status in (400, 413) and sent < 10 * MB, (status, answer, sent)


def test_a_45_mb_chat_body_is_413_without_reading_it(server, keys):
    auth = {"Authorization": f"Bearer {keys['viewer']}", "Content-Type": "application/json"}
    size = 45 * MB
    # Declared: answered from the head alone, before one byte of the body is sent.
    status, answer, sent = exchange(server, head("POST", "/v1/chat/completions", {**auth, "Content-Length": size}),
                                    filler(size), wait_first=5)
    assert status == 413 and sent == 0 and "BEAVER_MAX_BODY_MB" in answer["error"]["message"], (status, answer, sent)
    # Chunked: counted as it comes, answered once past 1 MB.
    body = [b'{"model": "m", "messages": [{"role": "user", "content": "', *filler(size)]
    status, answer, sent = exchange(server, head("POST", "/v1/chat/completions",
                                                 {**auth, "Transfer-Encoding": "chunked"}), chunked(body))
    assert status == 413 and sent < 20 * MB, (status, answer, sent)
    # The server is not tied up: health answers at once.
    status, _, _ = exchange(server, head("GET", "/v1/health", {}), [], timeout=5)
    assert status in (200, 503)


@pytest.mark.parametrize("authorization", [None, "Bearer bvr_not-a-key", "Basic abc"])
def test_401_comes_before_the_body_is_read(server, keys, authorization):
    keyless = {"Authorization": authorization} if authorization else {}
    size = 100 * MB
    for path, content_type in (("/v1/chat/completions", "application/json"),
                               ("/v1/datasets", "multipart/form-data; boundary=x")):
        headers = {**keyless, "Content-Type": content_type, "Content-Length": size}
        status, answer, sent = exchange(server, head("POST", path, headers), filler(size), wait_first=5)
        assert status == 401 and sent == 0 and answer["error"]["code"] == "unauthorized", (path, status, sent)
        headers = {**keyless, "Content-Type": content_type, "Transfer-Encoding": "chunked"}
        status, answer, sent = exchange(server, head("POST", path, headers), chunked(filler(size)), wait_first=5)
        assert status == 401 and sent == 0, (path, status, sent)


def test_a_body_within_the_limits_goes_through(server, keys):
    records = b"\n".join(json.dumps({"prompt": f"p {i}"}).encode() for i in range(1000))
    boundary = "b"
    form = (f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nok\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="kind"\r\n\r\nprompt\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="d.jsonl"\r\n\r\n').encode() \
        + records + f"\r\n--{boundary}--\r\n".encode()
    request = head("POST", "/v1/datasets", {"Authorization": f"Bearer {keys['admin']}", "Transfer-Encoding": "chunked",
                                             "Content-Type": f"multipart/form-data; boundary={boundary}"})
    status, answer, _ = exchange(server, request, chunked([form[i:i + 4096] for i in range(0, len(form), 4096)]))
    assert status == 201 and answer["num_records"] == 1000, answer
