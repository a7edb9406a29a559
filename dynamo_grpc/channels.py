"""Shared client channels: one per endpoint (and lane), sized for KV chunks."""

from __future__ import annotations

import asyncio

import grpc

from dynamo_grpc.security import Tls, open_channel

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)
# gRPC's default reconnect backoff starts at 1 s and grows to 2 minutes: a worker back at the same address
# after a crash would stay unreachable that long (every call fails at once while the channel waits). Capped,
# a channel tries again within a second; a fleet that sees the worker's new record resets it at once.
RECONNECT_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)
RESET_GRACE_S = 60.0
"""How long calls still running on a reset channel may go on before it is closed under them."""


class ChannelPool:
    """Reuses one channel per endpoint; gRPC multiplexes concurrent calls over it. Lanes other than 0 are
    channels of their own to the same endpoint, each with its own connection: parallel KV pulls run on
    separate lanes so one connection's single-threaded framing does not bound them. With `tls` (the process's
    own settings) every channel is TLS, presenting the process's certificate where it has one."""

    def __init__(self, tls: Tls | None = None) -> None:
        self._channels: dict[tuple[str, int], grpc.aio.Channel] = {}
        self._retiring: dict[asyncio.Task[None], grpc.aio.Channel] = {}
        self.tls = tls

    def get(self, endpoint: str, *, lane: int = 0) -> grpc.aio.Channel:
        channel = self._channels.get((endpoint, lane))
        if channel is None:
            # A channel argument of its own keeps gRPC from sharing one connection among the lanes.
            options = CHANNEL_OPTIONS + RECONNECT_OPTIONS + ((("dynamo_grpc.lane", lane),) if lane else ())
            channel = open_channel(endpoint, self.tls, options)
            self._channels[(endpoint, lane)] = channel
        return channel

    def reset(self, endpoint: str) -> int:
        """Forget the endpoint's channels (every lane), so the next call connects afresh instead of waiting
        out a backoff from a process that is gone; calls running on them get RESET_GRACE_S to finish.
        Returns how many channels were reset."""
        stale = [key for key in self._channels if key[0] == endpoint]
        for key in stale:
            channel = self._channels.pop(key)
            closing = asyncio.ensure_future(channel.close(RESET_GRACE_S))
            self._retiring[closing] = channel
            closing.add_done_callback(self._retiring.pop)
        return len(stale)

    async def close(self) -> None:
        for channel in [*self._channels.values(), *self._retiring.values()]:
            await channel.close()  # reset ones too, without waiting out their grace
        self._channels.clear()
        await asyncio.gather(*self._retiring, return_exceptions=True)
