"""What crosses between the server process and the engine core process, and how it is encoded.

Two PUSH/PULL ZeroMQ channels over IPC sockets (one direction each); every message is
[kind, payload]. Outputs, the hot path (one message per engine step, whatever the number of
streams), are msgpack through msgspec with a typed decoder; requests and the rare named calls
are pickled (their types are ours, unions included; both ends are the same trusted code).
"""

from __future__ import annotations

import pickle
from typing import Any

import msgspec

from server.engine.output_processor import RequestOutput

# server -> core
ADD = b"add"  # pickle(GenerationRequest)
ABORT = b"abort"  # request id (utf-8)
FINISH = b"finish"  # pickle((request id, FinishReason)): the server ended it (a stop string, a text error)
ABORT_ALL = b"abort_all"  # end of a graceful drain
CALL = b"call"  # pickle((call id, method name, args, kwargs))
STOP = b"stop"
# core -> server
READY = b"ready"  # pickle(CoreReady)
OUTPUTS = b"out"  # msgpack(list[RequestOutput]); an empty list is the core's heartbeat
ADMITTED = b"admitted"  # pickle((request id, error or None))
REPLY = b"reply"  # pickle((call id, result, error or None))

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[RequestOutput])


def encode_outputs(outputs: list[RequestOutput]) -> bytes:
    return _encoder.encode(outputs)


def decode_outputs(data: bytes) -> list[RequestOutput]:
    return _decoder.decode(data)


def dumps(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def loads(data: bytes) -> Any:
    return pickle.loads(data)


def error_state(exc: BaseException) -> tuple[type, tuple, dict]:
    """An exception as (type, args, attributes): our errors take keyword-only fields (code,
    param, path) that pickle's default (type(*args)) would drop."""
    return type(exc), exc.args, dict(vars(exc))


def rebuild_error(state: tuple[type, tuple, dict]) -> BaseException:
    cls, args, attrs = state
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(attrs)
    return exc
