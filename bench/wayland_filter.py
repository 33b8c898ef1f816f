"""The Wayland filter's added latency per message (SPEC §9.1; goal ≤ 0.2 ms median).

A fake compositor answers every ``wl_display.sync`` with ``wl_callback.done`` and
``wl_display.delete_id``. One client does 3000 sync round trips straight to it and 3000 through
the filter (in a thread of this process, as the user would run it), alternating in blocks of
100; the added latency per message is (median through − median direct) / 3, since a round
trip is one request and two events. Also printed: the session's own CPU time per message
(pure parsing and policy, no sockets).
"""

from __future__ import annotations

import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

from vmsilo.wayland import policy, protocol
from vmsilo.wayland.proxy import Proxy
from vmsilo.wayland.session import Session
from vmsilo.wayland.wire import NewId, encode

P = protocol.load()
SYNC = P["wl_display"].requests[0]
DONE = P["wl_callback"].events[0]
DELETE = next(m for m in P["wl_display"].events if m.name == "delete_id")
ROUNDS, BLOCK = 3000, 100


def compositor(srv: socket.socket) -> None:
    while True:
        try:
            conn, _ = srv.accept()
        except OSError:
            return
        threading.Thread(target=_serve, args=(conn,), daemon=True).start()


def _serve(conn: socket.socket) -> None:
    while data := conn.recv(4096):
        for pos in range(0, len(data), 12):  # get_registry and sync: 12 bytes each
            if data[pos + 4] == SYNC.opcode:
                oid = int.from_bytes(data[pos + 8 : pos + 12], "little")
                conn.sendall(encode(oid, DONE, [0])[0] + encode(1, DELETE, [oid])[0])


def rtt(path: str, n: int) -> list[float]:
    out = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.connect(path)
        req = encode(1, SYNC, [NewId(3)])[0]
        for _ in range(n):
            t = time.perf_counter()
            c.sendall(req)
            got = 0
            while got < 24:
                got += len(c.recv(4096))
            out.append(time.perf_counter() - t)
    return out


def main() -> None:
    d = Path(tempfile.mkdtemp())
    up = str(d / "compositor")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(up)
    srv.listen(8)
    threading.Thread(target=compositor, args=(srv,), daemon=True).start()
    proxy = Proxy(policy.Labels("bench", "green"), str(d / "vmsilo/bench-wayland.socket"), up, P)
    proxy.bind()
    threading.Thread(target=proxy.run, daemon=True).start()
    direct: list[float] = []
    filtered: list[float] = []
    for _ in range(ROUNDS // BLOCK):
        direct += rtt(up, BLOCK)
        filtered += rtt(proxy.listen_path, BLOCK)
    proxy.stop()
    md, mf = statistics.median(direct), statistics.median(filtered)
    print(
        f"sync round trip, median of {ROUNDS}: direct {md * 1e6:.0f} µs, "
        f"through the filter {mf * 1e6:.0f} µs"
    )
    print(f"added per message (3 per round trip): {(mf - md) / 3 * 1e3:.3f} ms (goal ≤ 0.2 ms)")
    s = Session(P, policy.Labels("bench", "green"))
    batch = encode(1, SYNC, [NewId(3)])[0]
    events = encode(3, DONE, [0])[0] + encode(1, DELETE, [3])[0]
    n = 20000
    t = time.perf_counter()
    for _ in range(n):
        s.from_client(batch, [])
        s.from_upstream(events, [])
    cpu = (time.perf_counter() - t) / (3 * n)
    print(f"session CPU per message (parse + policy, no sockets): {cpu * 1e6:.1f} µs")


if __name__ == "__main__":
    main()
