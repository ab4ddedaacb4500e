#!/usr/bin/env python3
"""Writes the small seed corpora in fuzz/corpus/<target>/seed-* (standard library only).

Frames come from the recorded CLN sessions in testdata/traces/*/*.jsonl (one message per hsmd
type, at most 2 KiB each); MQTT packets are encoded here by hand; tokens are upstream's test
vectors; bitcoind's replies carry a regtest block built and mined here. Re-running it rewrites the seed-* files and leaves everything else (corpus entries the
fuzzer found, regression inputs) alone.
"""
import glob
import hashlib
import json
import os
import struct

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")
MAX_MSG = 2048


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def clear_seeds():
    for p in glob.glob(os.path.join(CORPUS, "*", "seed-*")):
        os.remove(p)


# --- serial frames and hsmd messages from the traces -------------------------------------------
def traces():
    for path in sorted(glob.glob(os.path.join(ROOT, "testdata", "traces", "*", "*.jsonl"))):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    yield json.loads(line)


def request_frame(seq, peer_id, dbid, msg):
    return struct.pack(">HH", 0xAA55, seq) + peer_id + struct.pack(">QI", dbid, len(msg)) + msg


def reply_frame(seq, msg):
    return struct.pack(">HHI", 0x5AA5, seq, len(msg)) + msg


def trace_seeds():
    seen = set()
    seq = 0
    for e in traces():
        key = (e["dir"], e["type"])
        msg = bytes.fromhex(e["hex"])
        if key in seen or len(msg) > MAX_MSG:
            continue
        seen.add(key)
        seq = (seq + 1) & 0xFFFF
        ctx = e.get("ctx") or {}
        peer = bytes.fromhex(ctx["peer_id"]) if ctx.get("peer_id") else bytes(33)
        dbid = ctx.get("dbid") or 0
        name = "%s-%d" % (e["dir"], e["type"])
        if e["dir"] == "req":
            write("serial_request", name, request_frame(seq, peer, dbid, msg))
        else:
            write("serial_reply", name, reply_frame(seq, msg))
        write("hsmd", name, msg)
    # Length prefixes: a framed message, the bounds.
    write("hsmd", "framed", struct.pack(">I", 2) + b"\x00\x09")
    write("hsmd", "len-max", struct.pack(">I", 16 * 1024 * 1024))
    write("hsmd", "len-over", struct.pack(">I", 16 * 1024 * 1024 + 1))


# --- tokens ---------------------------------------------------------------------------------------
P = 2**256 - 2**32 - 977
G = (0x79BE667EF9DCBBAC55A06295CE870B07029BFCDB2DCE28D959F2815B16F81798,
     0x483ADA7726A3C4655DA4FBFC0E1108A8FD17B448A68554199C47D08FFB10D4B8)


def ec_add(a, b):
    if a is None:
        return b
    if b is None:
        return a
    if a[0] == b[0] and (a[1] + b[1]) % P == 0:
        return None
    if a == b:
        lam = 3 * a[0] * a[0] * pow(2 * a[1], P - 2, P) % P
    else:
        lam = (b[1] - a[1]) * pow(b[0] - a[0], P - 2, P) % P
    x = (lam * lam - a[0] - b[0]) % P
    return (x, (lam * (a[0] - x) - a[1]) % P)


def pubkey(secret):
    k, q, r = int.from_bytes(secret, "big"), G, None
    while k:
        if k & 1:
            r = ec_add(r, q)
        q = ec_add(q, q)
        k >>= 1
    return ("02" if r[1] % 2 == 0 else "03") + "%064x" % r[0]


def token_seeds():
    # Upstream sphinx-auther's test vectors (also in crates/wire/src/token.rs).
    cd = pubkey(bytes([0xCD]) * 32)
    t1 = "YvM0wyAZBWdHaVsS4sqy-ub3X0JRx7zVTY9O6aL0q_CIV9zOKykO_grPE4DSelinHNX9pTFZ3wEoLhg5QT7EVZpOlj0x"
    tribe_key = "02290714deafd0cb33d2be3b634fc977a98a9c9fa1dd6c53cf17d99b350c08c67b"
    t2 = "XuOp5B9kC3CcL52svtl_LJJJFbV1OTgnq7thtOjdKJMnOuETIw_hlLkVfonozVIwz5wADlya_i946GiKFZAgMto0cDuk"
    write("token", "upstream", ("%s\n%s" % (cd, t1)).encode())
    write("token", "tribe", ("%s\n%s" % (tribe_key, t2)).encode())
    write("token", "tribe-expired", ("%s\n%s\n%d" % (tribe_key, t2, 0x5EE3A9E4 + 301)).encode())
    write("token", "wrong-key", ("%s\n%s" % (cd, t2)).encode())
    write("token", "garbage", b"zz\n!!!!\n")


# --- MQTT -----------------------------------------------------------------------------------------
def remaining(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def packet(first, body):
    return bytes([first]) + remaining(len(body)) + body


def s(x):
    x = x.encode() if isinstance(x, str) else x
    return struct.pack(">H", len(x)) + x


def connect(client_id, user=None, password=None, keep_alive=30, level=4, will=None):
    flags = 0x02
    payload = s(client_id)
    if will:
        flags |= 0x04 | 0x08
        payload += s(will[0]) + s(will[1])
    if user is not None:
        flags |= 0x80
    if password is not None:
        flags |= 0x40
    if user is not None:
        payload += s(user)
    if password is not None:
        payload += s(password)
    return packet(0x10, s("MQTT") + bytes([level, flags]) + struct.pack(">H", keep_alive) + payload)


def subscribe(pkid, *filters):
    return packet(0x82, struct.pack(">H", pkid) + b"".join(s(f) + bytes([q]) for f, q in filters))


def unsubscribe(pkid, *filters):
    return packet(0xA2, struct.pack(">H", pkid) + b"".join(s(f) for f in filters))


def publish(topic, payload, qos=0, pkid=1):
    vh = s(topic) + (struct.pack(">H", pkid) if qos else b"")
    return packet(0x30 | (qos << 1), vh + payload)


def mqtt_seeds():
    node = "029e41168d807ac2a06bd2c6025aca1bf0c6401e9683be9bc66b06f07c54a0ef46"
    tok = "XuOp5B9kC3CcL52svtl_LJJJFbV1OTgnq7thtOjdKJMnOuETIw_hlLkVfonozVIwz5wADlya_i946GiKFZAgMto0cDuk"
    reply = reply_frame(1, b"\x00\x72" + bytes(40))
    signer = (connect(node, node, tok)
              + subscribe(1, (node + "/vls", 1), (node + "/control", 1))
              + publish(node + "/hello", b"")
              + packet(0x40, struct.pack(">H", 1))
              + publish(node + "/vls-res", reply, 1, 2)
              + publish(node + "/error", b"\x00\x01refused", 1, 3)
              + packet(0xC0, b"")
              + unsubscribe(4, node + "/control")
              + packet(0xE0, b""))
    write("mqtt_packet", "signer-session", signer)
    write("mqtt_packet", "acl-violations",
          connect("alice", "alice", "alice")
          + subscribe(1, ("#", 1), ("+/vls", 0), ("$SYS/#", 1), ("bob/#", 1), ("alice/#", 2), ("alice", 1))
          + publish("bob/vls", b"x", 1, 2) + publish("alice/+", b"x") + publish("alice/vls", b"ok", 1, 3))
    write("mqtt_packet", "qos2-and-acks",
          connect("a") + publish("a/b", b"q2", 2, 7) + packet(0x50, b"\x00\x07")
          + packet(0x62, b"\x00\x07") + packet(0x70, b"\x00\x07") + packet(0x90, b"\x00\x01\x00"))
    write("mqtt_packet", "mqtt5-connect", connect("x", level=5))
    write("mqtt_packet", "will", connect("w", "w", "w", will=("w/bye", b"gone")))
    write("mqtt_packet", "utf8-topics",
          connect("é", "é", "é") + subscribe(1, ("é/#", 1)) + publish("é/x", b"") + publish("é", b""))
    write("mqtt_packet", "long-remaining-length", bytes([0x30, 0xFF, 0xFF, 0xFF, 0x7F]))
    write("mqtt_packet", "no-connect", publish("alice/vls", b"x") + packet(0xC0, b""))
    for name, text in [("acl-own", "alice\nalice/vls\nalice/#"),
                       ("acl-bare", "alice\nalice\nalice/#"),
                       ("acl-plus", "alice\nalice/x\nalice/+"),
                       ("acl-foreign", "alice\nbob/vls\n+/vls"),
                       ("acl-sys", "alice\n$SYS/x\n#")]:
        write("mqtt_packet", name, text.encode())


# --- control messages (msgpack bodies; the check adds nonce and signature) -----------------------
def mp_str(x):
    b = x.encode()
    return (bytes([0xA0 | len(b)]) if len(b) < 32 else bytes([0xD9, len(b)])) + b


def mp_u64(n):
    return bytes([n]) if n < 128 else b"\xcf" + struct.pack(">Q", n)


def newtype(name, value):
    return b"\x81" + mp_str(name) + value


def control_seeds():
    for unit in ["Nonce", "ResetWifi", "ResetKeys", "ResetAll", "QueryPolicy", "QueryAllowlist",
                 "QueryVelocity", "QueryAll"]:
        write("control", "req-" + unit, mp_str(unit))
    policy = b"\x93" + mp_u64(21_000_000_000) + mp_str("daily") + mp_u64(1_000_000_000)
    write("control", "req-UpdatePolicy", newtype("UpdatePolicy", policy))
    allow = b"\x92" + mp_str("bcrt1qwd0sxj7f47k67wysm20xut2drv7t2stu7fesk4") + mp_str("x")
    write("control", "req-UpdateAllowlist", newtype("UpdateAllowlist", allow))
    write("control", "req-Ota", newtype("Ota", b"\x92" + mp_u64(3) + mp_str("https://example.invalid/fw")))
    write("control", "rep-Nonce", newtype("Nonce", mp_u64(2**40)))
    write("control", "rep-Error", newtype("Error", mp_str("refused")))
    velocity = b"\x93" + mp_u64(5) + mp_u64(10) + mp_str("hourly")
    write("control", "rep-VelocityCurrent", newtype("VelocityCurrent", velocity))
    write("control", "rep-AllCurrent", newtype("AllCurrent", b"\x93" + policy + allow + velocity))
    write("control", "trailing", mp_str("Nonce") + b"\x00")


# --- broker config --------------------------------------------------------------------------------
def config_seeds():
    write("broker_config", "full", b"""cln_version = "v25.12.1"
network = "regtest"
data_dir = "/var/lib/sphinx-broker"

[mqtt]
listen = "127.0.0.1:1883"
max_payload = 1048576
token_window_secs = 300

[relay]
queue_capacity = 1000
max_inflight = 64
request_timeout_secs = 600

[bitcoind]
url = "http://user:pass@127.0.0.1:18443"
""")
    write("broker_config", "minimal", b'network = "testnet"\n')
    write("broker_config", "invalid", b'[relay]\nmax_inflight = 0\n')
    write("broker_config", "unknown-key", b'bogus = 1\n[mqtt]\nlisten = "[::1]:8883"\n')


# --- LSS messages (upstream lss-connector msgs.rs shapes; see docs/wire.md "LSS") ------------
def mp_map(n):
    return bytes([0x80 | n])


def mp_bin(b):
    return bytes([0xc4, len(b)]) + b


def mp_uint(n):
    if n < 0x80:
        return bytes([n])
    return b"\xcf" + struct.pack(">Q", n)


def mp_muts(muts):
    out = mp_str("muts") + bytes([0x90 | len(muts)])
    for key, version, value in muts:
        out += b"\x92" + mp_str(key) + b"\x92" + mp_uint(version) + mp_bin(value)
    return out


def lss_seeds():
    muts = [("node/state/02aa", 3, b'{"x":1}'), ("sphinx/reply/7", 0, b"")]
    init = mp_map(1) + mp_str("Init")
    write("lss", "msg-init", init + mp_map(1) + mp_str("server_pubkey") + mp_bin(b"\x02" * 33))
    for v in ("Created", "Stored"):
        write("lss", "msg-%s" % v.lower(),
              mp_map(1) + mp_str(v) + mp_map(2) + mp_str("server_hmac") + mp_bin(b"\xab" * 32) + mp_muts(muts))
    write("lss", "msg-created-empty",
          mp_map(1) + mp_str("Created") + mp_map(2) + mp_str("server_hmac") + b"\xc0" + mp_muts([]))
    write("lss", "msg-putconflict", mp_map(1) + mp_str("PutConflict"))
    ident = mp_str("client_id") + mp_bin(b"\x03" * 33) + mp_str("auth_token") + mp_bin(b"\x11" * 32)
    write("lss", "res-init", init + mp_map(3) + ident + mp_str("nonce") + mp_bin(b"\x22" * 32))
    write("lss", "res-init-nonce-nil", init + mp_map(3) + ident + mp_str("nonce") + b"\xc0")
    for v in ("Created", "VlsMuts"):
        write("lss", "res-%s" % v.lower(),
              mp_map(1) + mp_str(v) + mp_map(2) + mp_str("client_hmac") + mp_bin(b"\x44" * 32) + mp_muts(muts))
    write("lss", "res-putconflictconfirmed", mp_map(1) + mp_str("PutConflictConfirmed"))
# --- bitcoind's JSON-RPC replies (target bitcoind_reply: method u8 | HTTP status u16 BE | body) --
def dsha(b):
    return hashlib.sha256(hashlib.sha256(b).digest()).digest()


REGTEST_GENESIS = "0f9188f13cb7b2c71f2a335e3a4fc328bf5beb436012afca590b1a11466e2206"


def regtest_block():
    """Block 1 on regtest's genesis, as bitcoind mines it: a BIP34 coinbase paying OP_TRUE with a
    witness commitment (BIP141), valid proof of work under regtest's limit (bits 0x207fffff)."""
    commitment = dsha(bytes(64))  # witness root of a coinbase-only block is 0; reserved value 0
    outputs = (struct.pack("<Q", 50 * 100_000_000) + b"\x01\x51"
               + struct.pack("<Q", 0) + b"\x26\x6a\x24\xaa\x21\xa9\xed" + commitment)
    txin = bytes(32) + b"\xff\xff\xff\xff" + b"\x03\x51\x01\x2a" + b"\xff\xff\xff\xff"
    base = struct.pack("<i", 2) + b"\x01" + txin + b"\x02" + outputs + bytes(4)
    with_witness = (struct.pack("<i", 2) + b"\x00\x01" + b"\x01" + txin + b"\x02" + outputs
                    + b"\x01\x20" + bytes(32) + bytes(4))
    merkle = dsha(base)
    target = 0x7FFFFF << (8 * (0x20 - 3))
    prefix = (struct.pack("<I", 0x20000000) + bytes.fromhex(REGTEST_GENESIS)[::-1] + merkle
              + struct.pack("<II", 1_795_466_161, 0x207FFFFF))
    nonce = 0
    while int.from_bytes(dsha(prefix + struct.pack("<I", nonce)), "little") > target:
        nonce += 1
    header = prefix + struct.pack("<I", nonce)
    return header, header + b"\x01" + with_witness


def rpc_seed(name, method, status, body):
    write("bitcoind_reply", name, bytes([method]) + struct.pack(">H", status) + body.encode())


def bitcoind_seeds():
    header, block = regtest_block()
    best = dsha(header)[::-1].hex()
    ok = lambda result: json.dumps({"result": result, "error": None, "id": 1}) + "\n"
    err = lambda code, msg: json.dumps({"result": None, "error": {"code": code, "message": msg}, "id": 1}) + "\n"
    info = {"chain": "regtest", "blocks": 1, "headers": 1, "bestblockhash": best,
            "difficulty": 4.656542373906925e-10, "time": 1795466161, "mediantime": 1795466161,
            "verificationprogress": 1, "initialblockdownload": False,
            "chainwork": "%064x" % 4, "size_on_disk": 577, "pruned": False, "warnings": []}
    rpc_seed("info", 0, 200, ok(info))
    rpc_seed("info-v2", 0, 200, json.dumps({"jsonrpc": "2.0", "result": info, "id": 1}) + "\n")
    rpc_seed("info-warmup", 0, 500, err(-28, "Loading block index\u2026"))
    rpc_seed("unauthorized", 0, 401, "")
    rpc_seed("hash", 1, 200, ok(best))
    rpc_seed("hash-out-of-range", 1, 500, err(-8, "Block height out of range"))
    rpc_seed("header", 2, 200, ok(header.hex()))
    rpc_seed("header-not-found", 2, 500, err(-5, "Block not found"))
    rpc_seed("block-segwit", 3, 200, ok(block.hex()))
    rpc_seed("block-trailing-data", 3, 200, ok(block.hex() + "00"))
    rpc_seed("method-not-found", 3, 404, err(-32601, "Method not found"))
    rpc_seed("proxy-error-page", 3, 502, "<html><body>502 Bad Gateway</body></html>")
    rpc_seed("nested", 0, 200, "[" * 200 + "]" * 200)


def main():
    clear_seeds()
    trace_seeds()
    token_seeds()
    mqtt_seeds()
    control_seeds()
    lss_seeds()
    config_seeds()
    bitcoind_seeds()
    for t in sorted(os.listdir(CORPUS)):
        if not os.path.isdir(os.path.join(CORPUS, t)):
            continue
        files = os.listdir(os.path.join(CORPUS, t))
        size = sum(os.path.getsize(os.path.join(CORPUS, t, f)) for f in files)
        print("%-16s %4d files %7d bytes" % (t, len(files), size))


if __name__ == "__main__":
    main()
