"""The KV room: KV bytes held for pulling, the transports that move them, their wire format, and the
prefix-cache events that name them. Engines produce and consume KV; everything about moving it is here."""
