#!/usr/bin/env python3
"""A fault-injecting HTTP proxy in front of the test S3 server (scripts/s3-server.sh).

    python3 scripts/s3-fault-proxy.py LISTEN_PORT UPSTREAM_PORT PIDFILE

Every request is forwarded unchanged, its Host header included, so SigV4 signatures made for
the proxy's address still verify upstream. On command the next N GETs fail:

    GET /__faults__/503/N        answer 503 SlowDown (a server under load)
    GET /__faults__/truncate/N   forward, but send only the first half of the body, with a
                                 Content-Length that matches the half (a well-formed short reply)
    GET /__faults__/cut/N        forward, announce the whole body, send half, close the connection
    GET /__faults__/none/0       stop injecting

The Swift tests (Tests/KVPackTests/Remote) start it beside the server and stop it by its PID.
"""
import http.client
import http.server
import os
import signal
import socket
import sys
import threading

listen_port, upstream_port, pid_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
state = {"kind": "none", "count": 0}
lock = threading.Lock()


class Proxy(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def take_fault(self):
        if self.command != "GET":
            return None
        with lock:
            if state["count"] > 0:
                state["count"] -= 1
                return state["kind"]
        return None

    def handle_any(self):
        if self.path.startswith("/__faults__/"):
            _, _, kind, count = self.path.split("/")
            with lock:
                state["kind"], state["count"] = kind, int(count)
            self.reply(200, [], b"ok\n")
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        fault = self.take_fault()
        if fault == "503":
            xml = b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code><Message>injected by s3-fault-proxy</Message></Error>"
            self.reply(503, [("Content-Type", "application/xml")], xml)
            return
        upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
        upstream.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
        response = upstream.getresponse()
        data = response.read()
        headers = [(k, v) for k, v in response.getheaders() if k.lower() not in ("content-length", "transfer-encoding", "connection")]
        if self.command == "HEAD":
            headers.append(("Content-Length", response.getheader("Content-Length") or "0"))
            self.reply(response.status, headers, b"", length_header=False)
        elif fault == "truncate":
            self.reply(response.status, headers, data[: len(data) // 2])
        elif fault == "cut":
            self.send_response(response.status)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        else:
            self.reply(response.status, headers, data)
        upstream.close()

    def reply(self, status, headers, data, length_header=True):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        if length_header:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data:
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_any


# A test harness may start this from a thread that blocks signals, and the mask is inherited:
# without this, SIGTERM would never stop the proxy.
signal.pthread_sigmask(signal.SIG_UNBLOCK, set(signal.Signals))
server = http.server.ThreadingHTTPServer(("127.0.0.1", listen_port), Proxy)
with open(pid_file, "w") as f:
    f.write(str(os.getpid()))
server.serve_forever()
