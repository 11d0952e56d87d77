"""A fault-injecting TCP proxy for network-fault tests.

Sits between the edge and the cloud on 127.0.0.1 and forwards bytes both
ways, while the test injects faults into the client -> server direction:

  proxy.down()                   refuse new connections (accept and reset at once),
                                 and reset the ones open now: "the cloud is down"
  proxy.up()                     back to normal
  proxy.cut_after(n, times=1)    reset a connection after forwarding n more upstream bytes
  proxy.flip_at(n, times=1)      flip one bit of the upstream byte n bytes from now
  proxy.stall()/proxy.resume()   hold upstream bytes (buffer them) until resume()
  proxy.rate(bytes_per_s)        shape upstream throughput (0 = unlimited)

Counters: proxy.bytes_up, proxy.bytes_down, proxy.connections, proxy.resets.
One thread runs a selector loop; the control methods are thread-safe.
"""
import selectors
import socket
import struct
import threading
import time


class FaultProxy:
    def __init__(self, target_port, target_host="127.0.0.1"):
        self.target = (target_host, target_port)
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.lsock.setblocking(False)
        self.port = self.lsock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.lsock, selectors.EVENT_READ, ("listen", None))
        self.pairs = []              # [client, server, pending_up(bytearray)]
        self._down = False
        self._cut = []               # remaining upstream bytes before a reset
        self._flip = []              # remaining upstream bytes before a flipped bit
        self._stalled = False
        self._rate = 0
        self._rate_t = time.monotonic()
        self._rate_budget = 0.0
        self.bytes_up = 0
        self.bytes_down = 0
        self.connections = 0
        self.resets = 0
        self.flips = 0
        self._stop = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    # ------------------------------------------------------------ control
    def down(self):
        with self.lock:
            self._down = True
            for p in list(self.pairs):
                self._reset(p)

    def up(self):
        with self.lock:
            self._down = False

    def cut_after(self, n, times=1):
        with self.lock:
            self._cut.extend([n] * times)

    def flip_at(self, n, times=1):
        with self.lock:
            self._flip.extend([n] * times)

    def stall(self):
        with self.lock:
            self._stalled = True

    def resume(self):
        with self.lock:
            self._stalled = False

    def rate(self, bytes_per_s):
        with self.lock:
            self._rate = bytes_per_s
            self._rate_budget = 0.0
            self._rate_t = time.monotonic()

    def close(self):
        self._stop = True
        self.thread.join(timeout=5)
        with self.lock:
            for p in list(self.pairs):
                self._close_pair(p)
        self.lsock.close()
        self.sel.close()

    # ------------------------------------------------------------ internals
    def _close_pair(self, p, reset=False):
        if p not in self.pairs:
            return
        self.pairs.remove(p)
        for s in p[:2]:
            try:
                self.sel.unregister(s)
            except (KeyError, ValueError):
                pass
            if reset:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()

    def _reset(self, p):
        self.resets += 1
        self._close_pair(p, reset=True)

    def _accept(self):
        try:
            c, _ = self.lsock.accept()
        except BlockingIOError:
            return
        if self._down:
            self.resets += 1
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()
            return
        try:
            s = socket.create_connection(self.target, timeout=5)
        except OSError:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()
            return
        for x in (c, s):
            x.setblocking(False)
            x.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        p = [c, s, bytearray()]
        self.pairs.append(p)
        self.connections += 1
        self.sel.register(c, selectors.EVENT_READ, ("up", p))
        self.sel.register(s, selectors.EVENT_READ, ("down", p))

    def _send_all(self, sock, data):
        sock.setblocking(True)
        try:
            sock.sendall(data)
        finally:
            sock.setblocking(False)

    def _flush_up(self, p):
        """Forwards pending upstream bytes, applying faults and the rate limit."""
        buf = p[2]
        while buf and not self._stalled and p in self.pairs:
            n = len(buf)
            if self._rate:
                now = time.monotonic()
                self._rate_budget = min(self._rate_budget + (now - self._rate_t) * self._rate,
                                        self._rate / 10 + 1)
                self._rate_t = now
                n = min(n, int(self._rate_budget))
                if n <= 0:
                    return
            if self._cut:
                n = min(n, self._cut[0]) if self._cut[0] > 0 else 0
            if self._flip:
                n = min(n, self._flip[0] + 1)
            data = bytes(buf[:n])
            if self._flip and self._flip[0] < len(data):
                i = self._flip[0]
                data = data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]
                self._flip.pop(0)
                self.flips += 1
            elif self._flip:
                self._flip[0] -= len(data)
            if self._cut:
                if self._cut[0] == 0:
                    self._cut.pop(0)
                    self._reset(p)
                    return
                self._cut[0] -= len(data)
            try:
                self._send_all(p[1], data)
            except OSError:
                self._reset(p)
                return
            del buf[:len(data)]
            self.bytes_up += len(data)
            if self._rate:
                self._rate_budget -= len(data)
            if self._cut and self._cut[0] == 0:
                self._cut.pop(0)
                self._reset(p)
                return

    def _loop(self):
        while not self._stop:
            events = self.sel.select(timeout=0.02)
            with self.lock:
                for key, _ in events:
                    kind, p = key.data
                    if kind == "listen":
                        self._accept()
                        continue
                    if p not in self.pairs:
                        continue
                    src = p[0] if kind == "up" else p[1]
                    try:
                        data = src.recv(262144)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        self._close_pair(p)
                        continue
                    if kind == "up":
                        p[2].extend(data)
                        self._flush_up(p)
                    else:
                        try:
                            self._send_all(p[0], data)
                            self.bytes_down += len(data)
                        except OSError:
                            self._reset(p)
                for p in list(self.pairs):
                    if p[2]:
                        self._flush_up(p)
