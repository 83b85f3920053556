"""What both parties import to talk across the trust boundary: TLS set-up with a pinned
certificate (``tls``), the typed, size-capped frames and their receiving protocol (``frames``), a
framed numpy channel over TLS (``channel``), and the typed control messages between the client and
the server's gateway (``control``). Nothing here imports Ray."""
