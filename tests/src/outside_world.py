"""The network tests' outside world: HTTP servers, a UDP echo and a DNS responder (python3 stdlib only).

Run inside the outside world's network namespace by tests/src/net.rs (OutsideWorld):

    outside_world.py --http IP:PORT ... --http6 IPV6:PORT ... --udp-echo IP:PORT ... --dns IP:PORT ... --name NAME=IP ...

Every socket is bound before "ready" is printed on stdout; then one line per request served:
    http CLIENT_IP SERVER_IP:PORT PATH
    udp CLIENT_IP SERVER_IP:PORT
    dns CLIENT_IP SERVER_IP:PORT NAME TYPE ANSWER
An HTTP answer's body is "CLIENT_IP SERVER_IP:PORT\\n": the address the request came from, as the server saw it,
except for the stand-in package index below.
A datagram to a --udp-echo or --dns socket that is a DNS query is answered from the --name table (A records;
NXDOMAIN for other names, an empty answer for other types of known names); any other datagram is echoed back.
"""

import argparse
import base64
import hashlib
import html
import http.server
import io
import socket
import struct
import sys
import threading
import zipfile

LOCK = threading.Lock()

# ---- The stand-in package index ---------------------------------------------------------------------------
#
# Every HTTP server also answers as a PEP 503 "simple" package index at /simple/ (the Python client suite points
# pip's PIP_INDEX_URL at http://A:8080/simple/ to run the seed snippet `pip install torch` offline). It knows one
# project, `torch`, with one file: a tiny pure-Python wheel made here at start with zipfile. It is NOT PyTorch:
# a stand-in whose version, 2.99.0, no real torch release has, whose package is one `torch/__init__.py` saying
# so, and whose metadata's Summary says so too. Its links carry `#sha256=` fragments (pip checks them).

STANDIN_PROJECT = "torch"
STANDIN_VERSION = "2.99.0"
STANDIN_WHEEL = f"{STANDIN_PROJECT}-{STANDIN_VERSION}-py3-none-any.whl"


def record_hash(data):
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def standin_wheel():
    """The stand-in wheel's bytes (the same bytes on every start: fixed timestamps, fixed order)."""
    dist_info = f"{STANDIN_PROJECT}-{STANDIN_VERSION}.dist-info"
    files = [
        (
            f"{STANDIN_PROJECT}/__init__.py",
            '"""A stand-in for torch served by the sandboxd tests\' package index (tests/src/outside_world.py).'
            '\n\nNot PyTorch: it has nothing but this version.\n"""\n\n'
            f'__version__ = "{STANDIN_VERSION}"\n',
        ),
        (
            f"{dist_info}/METADATA",
            "Metadata-Version: 2.1\n"
            f"Name: {STANDIN_PROJECT}\n"
            f"Version: {STANDIN_VERSION}\n"
            "Summary: Stand-in for torch in the sandboxd tests' package index (not PyTorch)\n",
        ),
        (
            f"{dist_info}/WHEEL",
            "Wheel-Version: 1.0\n"
            "Generator: sandboxd-tests-outside-world\n"
            "Root-Is-Purelib: true\n"
            "Tag: py3-none-any\n",
        ),
        (f"{dist_info}/top_level.txt", f"{STANDIN_PROJECT}\n"),
    ]
    record = "".join(f"{name},{record_hash(text.encode())},{len(text.encode())}\n" for name, text in files)
    record += f"{dist_info}/RECORD,,\n"
    files.append((f"{dist_info}/RECORD", record))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, text in files:
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            z.writestr(info, text)
    return buf.getvalue()


def index_pages():
    """Path -> (content type, body) of the stand-in index."""
    wheel = standin_wheel()
    sha = hashlib.sha256(wheel).hexdigest()
    name = html.escape(STANDIN_WHEEL)

    def page(title, links):
        return (
            "text/html; charset=utf-8",
            f"<!DOCTYPE html>\n<html><head><meta name=\"pypi:repository-version\" content=\"1.0\">"
            f"<title>{title}</title></head><body>\n{links}</body></html>\n".encode(),
        )

    return {
        "/simple/": page("Simple index", f'<a href="/simple/{STANDIN_PROJECT}/">{STANDIN_PROJECT}</a>\n'),
        f"/simple/{STANDIN_PROJECT}/": page(
            f"Links for {STANDIN_PROJECT}",
            f'<a href="/packages/{name}#sha256={sha}">{name}</a>\n',
        ),
        f"/packages/{STANDIN_WHEEL}": ("application/octet-stream", wheel),
    }


INDEX = index_pages()


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
        log("http", client, f"{server}:{port}", self.path)
        path = self.path.split("?", 1)[0]
        if path in INDEX:
            ctype, body = INDEX[path]
        elif path == "/simple" or path.startswith("/simple/") or path.startswith("/packages/"):
            # The index knows no other project or file.
            self.send_error(404)
            return
        else:
            ctype, body = "text/plain", f"{client} {server}:{port}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class Server6(Server):
    address_family = socket.AF_INET6


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
    p.add_argument("--http6", action="append", default=[], type=addr)
    p.add_argument("--udp-echo", action="append", default=[], type=addr)
    p.add_argument("--dns", action="append", default=[], type=addr)
    p.add_argument("--name", action="append", default=[])
    a = p.parse_args()
    names = {}
    for n in a.name:
        k, v = n.split("=", 1)
        names[k.lower().rstrip(".")] = v
    servers = [Server(hp, Handler) for hp in a.http] + [Server6(hp, Handler) for hp in a.http6]
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
