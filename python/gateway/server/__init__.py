"""`server.engine: uvloop`: HTTP/1.1 served on each worker's own uvloop event loop.

granian hands every request and every response chunk across threads (its Rust runtime and the
worker's Python loop) and queues response chunks without bound, so a slow reader cannot hold
back the upstream. This engine parses HTTP/1.1 with httptools (llhttp) in an `asyncio.Protocol`
on the worker's loop: no thread hop, and `send_bytes` waits for the socket to drain.

- `http11.py`: the connection protocol and the RSGI adapter (`scope`, the `protocol` object the
  app answers on): the same `Gateway` app runs on both engines.
- `workers.py`: the master and its forked worker processes sharing one listening socket.
"""
