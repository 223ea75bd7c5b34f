"""wire.py, the gRPC framing helpers of the ASGI front end: grpc-timeout, grpc-message,
message frames (cut at any chunking) and per-message decompression."""

from __future__ import annotations

import gzip
import os
import urllib.parse
import zlib
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernelport.errors import ErrorCode, ServerError
from kernelport.protocols.grpc import wire

# Derandomized and without a database: the same inputs every run, so nothing can flake.
FIXED = settings(max_examples=150, derandomize=True, database=None, deadline=None)

# --- grpc-timeout ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (b"2H", 7200.0),
        (b"3M", 180.0),
        (b"4S", 4.0),
        (b"250m", 0.25),
        (b"7u", 7e-6),
        (b"9n", 9e-9),
        (b"0S", 0.0),
        (b"00000001m", 1e-3),
        (b"99999999S", 99999999.0),  # the most digits allowed
    ],
)
def test_parse_timeout_units(value: bytes, seconds: float) -> None:
    assert wire.parse_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"S",
        b"10",
        b"123456789S",  # nine digits
        b"-1S",
        b"+1S",
        b"1.5S",
        b" 1S",
        b"1 S",
        b"1s",  # units are case-sensitive: 's' is not one
        b"1h",
        b"1Sx",
        "\u0661S".encode(),  # ARABIC-INDIC DIGIT ONE: a digit, but not an ASCII one
    ],
)
def test_parse_timeout_refuses_malformed_values(value: bytes) -> None:
    with pytest.raises(ValueError) as info:
        wire.parse_timeout(value)
    assert str(info.value) == f"malformed grpc-timeout {value!r}"


def test_parse_timeout_quotes_at_most_16_bytes() -> None:
    with pytest.raises(ValueError) as info:
        wire.parse_timeout(b"x" * 1000)
    assert str(info.value) == f"malformed grpc-timeout {b'x' * 16!r}"


# --- grpc-message ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "encoded"),
    [
        ("model 'echo' is not found", b"model 'echo' is not found"),
        ("", b""),
        ("100%", b"100%25"),
        ("é", b"%C3%A9"),
        ("line\nbreak\ttab", b"line%0Abreak%09tab"),
        ("\x7f~ ", b"%7F~ "),
        ("\ud800", b"?"),  # a lone surrogate cannot be UTF-8: replaced, not an error
    ],
)
def test_encode_message(text: str, encoded: bytes) -> None:
    assert wire.encode_message(text) == encoded


@FIXED
@given(st.text())
def test_encode_message_is_printable_ascii_and_decodes_back(text: str) -> None:
    encoded = wire.encode_message(text)
    assert all(0x20 <= b <= 0x7E for b in encoded)
    raw = urllib.parse.unquote_to_bytes(encoded.decode("ascii"))
    assert raw == text.encode("utf-8", "replace")


# --- frames ---------------------------------------------------------------------------------


def test_frame_header() -> None:
    assert wire.frame_header(5) == b"\0\0\0\0\5"
    assert wire.frame_header(0x01020304, compressed=True) == b"\1\1\2\3\4"
    assert len(wire.frame_header(0)) == wire.HEADER_BYTES


def test_too_large_uses_grpcios_words() -> None:
    error = wire.too_large("Received", 70, 64)
    assert (error.code, error.message) == (
        ErrorCode.RESOURCE_EXHAUSTED,
        "Received message larger than max (70 vs. 64)",
    )


messages = st.lists(st.tuples(st.booleans(), st.binary(max_size=40)), max_size=8)


@FIXED
@given(messages=messages, data=st.data())
def test_deframer_cuts_any_chunking_into_the_messages(
    messages: list[tuple[bool, bytes]], data: st.DataObject
) -> None:
    stream = b"".join(wire.frame_header(len(m), c) + m for c, m in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    deframer = wire.Deframer(limit=40)
    got = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        got += deframer.feed(stream[start:end])
    assert deframer.pending == 0
    # The views handed out earlier are still intact after the later feeds.
    assert [(c, bytes(m)) for c, m in got] == messages


@FIXED
@given(st.binary(max_size=60), st.integers(1, 5))
def test_deframer_holds_back_an_incomplete_message(message: bytes, missing: int) -> None:
    stream = wire.frame_header(len(message)) + message
    deframer = wire.Deframer(limit=100)
    assert deframer.feed(stream[:-missing]) == []
    assert deframer.pending == len(stream) - missing
    [(compressed, view)] = deframer.feed(stream[-missing:])
    assert (compressed, bytes(view), deframer.pending) == (False, message, 0)


def test_deframer_slices_whole_messages_out_of_the_chunk() -> None:
    chunk = wire.frame_header(3) + b"abc" + wire.frame_header(0) + wire.frame_header(2) + b"xy"
    found = wire.Deframer(limit=10).feed(chunk)
    assert [(c, bytes(m)) for c, m in found] == [(False, b"abc"), (False, b""), (False, b"xy")]
    assert all(m.obj is chunk for _, m in found)  # views into the chunk, nothing copied


@pytest.mark.parametrize("flag", [2, 0x80, 0xFF])
def test_deframer_refuses_unknown_flags(flag: int) -> None:
    deframer = wire.Deframer(limit=10)
    with pytest.raises(ServerError) as info:
        deframer.feed(bytes([flag]) + (1).to_bytes(4, "big"))  # refused before its body comes
    assert (info.value.code, info.value.message) == (
        ErrorCode.INTERNAL,
        f"bad gRPC frame flag {flag}",
    )


def test_deframer_refuses_a_declared_length_over_the_limit_at_once() -> None:
    deframer = wire.Deframer(limit=10)
    assert deframer.feed(wire.frame_header(10) + b"x" * 10) != []  # at the limit: fine
    deframer.feed(wire.frame_header(11)[:3])
    with pytest.raises(ServerError) as info:
        deframer.feed(wire.frame_header(11)[3:])  # the header completes: no body awaited
    assert (info.value.code, info.value.message) == (
        ErrorCode.RESOURCE_EXHAUSTED,
        "Received message larger than max (11 vs. 10)",
    )


# --- decompression --------------------------------------------------------------------------


def deflate(data: bytes) -> bytes:
    return zlib.compress(data)


@pytest.mark.parametrize(
    ("encoding", "compress"), [(b"gzip", gzip.compress), (b"deflate", deflate)]
)
def test_inflate(encoding: bytes, compress: Callable[[bytes], bytes]) -> None:
    data = os.urandom(300) + b"\0" * 3000
    assert wire.inflate(compress(data), encoding, limit=len(data)) == data
    assert wire.inflate(memoryview(compress(b"")), encoding, limit=0) == b""
    with pytest.raises(ServerError) as info:
        wire.inflate(compress(data), encoding, limit=len(data) - 1)
    assert (info.value.code, info.value.message) == (
        ErrorCode.RESOURCE_EXHAUSTED,
        f"Received decompressed message larger than max ({len(data)} vs. {len(data) - 1})",
    )


def test_inflate_stops_a_bomb_at_the_limit() -> None:
    bomb = gzip.compress(b"\0" * (64 << 20))  # 64 MiB of zeros in ~64 KiB
    with pytest.raises(ServerError) as info:
        wire.inflate(bomb, b"gzip", limit=1 << 20)
    assert info.value.code is ErrorCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize(
    ("data", "encoding", "why"),
    [
        (b"plain text", b"gzip", "Error -3 while decompressing data: incorrect header check"),
        (deflate(b"payload"), b"gzip", "Error -3 while decompressing data: incorrect header check"),
        (
            gzip.compress(b"payload", mtime=0),
            b"deflate",
            "Error -3 while decompressing data: incorrect header check",
        ),
        (gzip.compress(b"payload" * 50, mtime=0)[:-4], b"gzip", "it is truncated"),
        (deflate(b"payload" * 50)[:10], b"deflate", "it is truncated"),
        (b"", b"gzip", "it is truncated"),
    ],
    # Named, not shown: every xdist worker must collect the same ids.
    ids=["text-as-gzip", "deflate-as-gzip", "gzip-as-deflate", "cut-gzip", "cut-deflate", "empty"],
)
def test_inflate_refuses_what_it_cannot_decode(data: bytes, encoding: bytes, why: str) -> None:
    with pytest.raises(ServerError) as info:
        wire.inflate(data, encoding, limit=1000)
    assert (info.value.code, info.value.message) == (
        ErrorCode.INTERNAL,
        f"cannot decompress the message: {why}",
    )


def test_deframer_joins_a_message_that_spans_chunks_once_into_bytes() -> None:
    message = bytes(range(256)) * 40
    stream = wire.frame_header(len(message)) + message + wire.frame_header(2) + b"ok"
    deframer = wire.Deframer(limit=1 << 20)
    assert deframer.feed(stream[:3]) == []  # part of the header
    assert deframer.feed(stream[3:4000]) == []
    assert deframer.pending == 4000  # the header and the part of the message
    (first, second) = deframer.feed(memoryview(bytearray(stream[4000:])))
    assert first == (False, message) and type(first[1]) is bytes  # protobuf parses it as is
    assert (second[0], bytes(second[1]), deframer.pending) == (False, b"ok", 0)
