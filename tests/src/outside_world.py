"""The network tests' outside world: HTTP servers, a UDP echo and a DNS responder (python3 stdlib only).

Run inside the outside world's network namespace by tests/src/net.rs (OutsideWorld):

    outside_world.py --http IP:PORT ... --udp-echo IP:PORT ... --dns IP:PORT ... --name NAME=IP ...

Every socket is bound before "ready" is printed on stdout; then one line per request served:
    http CLIENT_IP SERVER_IP:PORT PATH
    udp CLIENT_IP SERVER_IP:PORT
    dns CLIENT_IP SERVER_IP:PORT NAME TYPE ANSWER
An HTTP answer's body is "CLIENT_IP SERVER_IP:PORT\\n": the address the request came from, as the server saw it.
A datagram to a --udp-echo or --dns socket that is a DNS query is answered from the --name table (A records;
NXDOMAIN for other names, an empty answer for other types of known names); any other datagram is echoed back.
"""

import argparse
import http.server
import socket
import struct
import sys
import threading

LOCK = threading.Lock()


def log(*parts):
    with LOCK:
        sys.stdout.write(" ".join(str(p) for p in parts) + "\n")
        sys.stdout.flush()


def addr(text):
    host, port = text.rsplit(":", 1)
    return host, int(port)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        client = self.client_address[0]
        server, port = self.connection.getsockname()[:2]
        body = f"{client} {server}:{port}\n".encode()
        log("http", client, f"{server}:{port}", self.path)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def parse_name(data, off):
    labels = []
    while True:
        n = data[off]
        off += 1
        if n == 0:
            return ".".join(labels).lower(), off
        if n & 0xC0:
            raise ValueError("compressed name in a question")
        labels.append(data[off:off + n].decode("ascii", "replace"))
        off += n


def dns_answer(data, names):
    """The answer to a DNS query, or None when `data` is not one."""
    if len(data) < 12:
        return None
    qid, flags, qd, an, ns, ar = struct.unpack("!6H", data[:12])
    if flags & 0x8000 or qd != 1 or an or ns:
        return None
    try:
        name, off = parse_name(data, 12)
        qtype, qclass = struct.unpack("!2H", data[off:off + 4])
    except (IndexError, ValueError, struct.error):
        return None
    question = data[12:off + 4]
    rd = flags & 0x0100
    if name not in names:
        header = struct.pack("!6H", qid, 0x8180 | rd | 3, 1, 0, 0, 0)
        return header + question, name, qtype, "NXDOMAIN"
    if qtype != 1 or qclass != 1:
        header = struct.pack("!6H", qid, 0x8180 | rd, 1, 0, 0, 0)
        return header + question, name, qtype, "-"
    ip = names[name]
    header = struct.pack("!6H", qid, 0x8180 | rd, 1, 1, 0, 0)
    rr = struct.pack("!HHHIH", 0xC00C, 1, 1, 30, 4) + socket.inet_aton(ip)
    return header + question + rr, name, qtype, ip


def serve_udp(sock, names):
    server, port = sock.getsockname()[:2]
    while True:
        data, peer = sock.recvfrom(65535)
        answer = dns_answer(data, names)
        if answer is None:
            log("udp", peer[0], f"{server}:{port}")
            sock.sendto(data, peer)
        else:
            reply, name, qtype, shown = answer
            log("dns", peer[0], f"{server}:{port}", name, qtype, shown)
            sock.sendto(reply, peer)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--http", action="append", default=[], type=addr)
    p.add_argument("--udp-echo", action="append", default=[], type=addr)
    p.add_argument("--dns", action="append", default=[], type=addr)
    p.add_argument("--name", action="append", default=[])
    a = p.parse_args()
    names = {}
    for n in a.name:
        k, v = n.split("=", 1)
        names[k.lower().rstrip(".")] = v
    servers = [Server(hp, Handler) for hp in a.http]
    udp = []
    for hp in a.udp_echo + a.dns:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(hp)
        udp.append(s)
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    for s in udp:
        threading.Thread(target=serve_udp, args=(s, names), daemon=True).start()
    log("ready")
    # Runs until killed; stdin is not read.
    threading.Event().wait()


if __name__ == "__main__":
    main()
