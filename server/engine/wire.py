"""What crosses between the server process and the engine core process, and how it is encoded.

Two PUSH/PULL ZeroMQ channels over IPC sockets (one direction each); every message is
[kind, payload]. Outputs, the hot path (one message per engine step, whatever the number of
streams), are msgpack through msgspec with a typed decoder, with the monotonic time the step's
outputs were sent (the inter-token latencies are differences of these times, all of the core's
clock); heartbeats carry how long the engine loop's current iteration has run. Requests and the
rare named calls are pickled (their types are ours, unions included; both ends are the same
trusted code).
"""

from __future__ import annotations

import pickle
from typing import Any

import msgspec

from server.engine.output_processor import RequestOutput

# server -> core
ADD = b"add"  # pickle(GenerationRequest)
ABORT = b"abort"  # request id (utf-8)
# pickle((request id, FinishReason, output tokens its client got or None)): the server ended it
# (a stop string, a text error)
FINISH = b"finish"
ABORT_ALL = b"abort_all"  # end of a graceful drain
CALL = b"call"  # pickle((call id, method name, args, kwargs))
STOP = b"stop"
# core -> server
READY = b"ready"  # pickle(CoreReady)
OUTPUTS = b"out"  # msgpack((monotonic seconds, list[RequestOutput]))
HEARTBEAT = b"beat"  # msgpack(seconds the engine loop's current iteration has run; 0.0 while it waits for work)
ADMITTED = b"admitted"  # pickle((request id, error or None))
REPLY = b"reply"  # pickle((call id, result, error or None))

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(tuple[float, list[RequestOutput]])
_beat_decoder = msgspec.msgpack.Decoder(float)


def encode_outputs(outputs: list[RequestOutput], sent_at: float) -> bytes:
    return _encoder.encode((sent_at, outputs))


def decode_outputs(data: bytes) -> tuple[float, list[RequestOutput]]:
    return _decoder.decode(data)


def encode_heartbeat(step_age: float) -> bytes:
    return _encoder.encode(step_age)


def decode_heartbeat(data: bytes) -> float:
    return _beat_decoder.decode(data)


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
