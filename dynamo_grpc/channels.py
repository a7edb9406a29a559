"""Shared client channels: one per endpoint (and lane), sized for KV chunks."""

from __future__ import annotations

import grpc

from dynamo_grpc.security import Tls, open_channel

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)


class ChannelPool:
    """Reuses one channel per endpoint; gRPC multiplexes concurrent calls over it. Lanes other than 0 are
    channels of their own to the same endpoint, each with its own connection: parallel KV pulls run on
    separate lanes so one connection's single-threaded framing does not bound them. With `tls` (the process's
    own settings) every channel is TLS, presenting the process's certificate where it has one."""

    def __init__(self, tls: Tls | None = None) -> None:
        self._channels: dict[tuple[str, int], grpc.aio.Channel] = {}
        self.tls = tls

    def get(self, endpoint: str, *, lane: int = 0) -> grpc.aio.Channel:
        channel = self._channels.get((endpoint, lane))
        if channel is None:
            # A channel argument of its own keeps gRPC from sharing one connection among the lanes.
            options = CHANNEL_OPTIONS + ((("dynamo_grpc.lane", lane),) if lane else ())
            channel = open_channel(endpoint, self.tls, options)
            self._channels[(endpoint, lane)] = channel
        return channel

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
