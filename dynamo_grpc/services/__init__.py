"""The gRPC servicers, one per proto service, and what they share: the server with its error mapping,
the request checks and engine runs, and the helpers of our bidirectional streams."""
