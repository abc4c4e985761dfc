#!/usr/bin/env python3
"""Hostile outside servers: the conformance harness in ../shared/conformance
(Google's grpcio, Python `websockets`) with servers that send legal messages
carrying hostile values, against `connector-host` as a black box.

Set-up and build as for the shared harness (see its first lines), then:
  ~/.venv-conf/bin/python conformance/hostile.py --project .            # every scenario
  ~/.venv-conf/bin/python conformance/hostile.py --project . NAME...    # some
Each scenario prints `PASS name: figures` or `FAIL name: why`; exit 0 only if all pass.
"""
import asyncio
import contextlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "..", "shared", "conformance")
sys.path.insert(0, os.environ.get("CONFORMANCE_DIR", SHARED))

import outside_server as h  # noqa: E402


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def start(ctx, n, *extra, transport="grpc", cp=None):
    cp = cp or h.ControlPlane()
    if transport == "grpc":
        front = h.GrpcFront(cp)
        port = await front.start()
        url = f"grpc://127.0.0.1:{port}"
    else:
        front = h.WsFront(cp)
        port = await front.start()
        url = f"ws://127.0.0.1:{port}"
    host = h.Host(ctx.binary, h.host_args(url, n, *extra), ctx.logdir).start()
    return cp, front, host


@contextlib.asynccontextmanager
async def hosted(ctx, n, *extra, transport="grpc", cp=None, active=False):
    """connector-host with n registrations on a fresh front-end, stopped on
    the way out; with active=True, first waits until all n are active (a
    harness error, so a failure with its reason, if they are not)."""
    cp, front, host = await start(ctx, n, *extra, transport=transport, cp=cp)
    try:
        if active and not await cp.wait_for(lambda: len(cp.live_keys()) == n, 30):
            raise RuntimeError(f"{n} registration(s) not active within 30 s")
        yield cp, host
    finally:
        await host.stop(); await front.stop()


async def rejected_forever(ctx, reason, want, why):
    """every register is rejected with `reason`; count the registers of one
    registration in 5 s: `want` is the (low, high) range the backoff allows."""
    cp = h.ControlPlane()
    cp.default_policy = ("reject", reason)
    async with hosted(ctx, 1, *h.FAST, cp=cp) as (cp, host):
        await asyncio.sleep(5)
        n = len(cp.registers)
        alive = host.proc.poll() is None
        lo, hi = want
        return lo <= n <= hi and alive, f"registers in 5 s from one registration: {n} (want {lo}..{hi}: {why}); host alive {alive}"


async def sc_session_expired_forever(ctx):
    """every register is rejected SESSION_EXPIRED: one immediate retry, then escalating backoff (no hot loop)."""
    return await rejected_forever(ctx, h.pb.REJECT_REASON_SESSION_EXPIRED, (2, 20),
                                  "one immediate retry, then backoff to the 2 s cap")


async def sc_duplicate_forever(ctx):
    """every register is rejected DUPLICATE: backoff escalates to the cap."""
    return await rejected_forever(ctx, h.pb.REJECT_REASON_DUPLICATE, (1, 15),
                                  "backoff to the 2 s cap")


async def sc_drain_forever(ctx):
    """drain with reconnect_after_ms = 2^32-1 under --max-backoff-ms 2000: back within the cap, not in 49 days."""
    async with hosted(ctx, 1, *h.FAST, active=True) as (cp, host):
        first = cp.live()[0]
        first.send(drain=h.pb.Drain(reason="bye", reconnect_after_ms=4294967295))
        t0 = asyncio.get_running_loop().time()
        ok = await cp.wait_for(lambda: any(s is not first for s in cp.live()), 8)
        dt = asyncio.get_running_loop().time() - t0
        return ok, f"back after drain in {dt:.2f} s (want <= ~2.5 s, the cap plus jitter)"


async def sc_unknown_reject_reason(ctx):
    """a rejection with reason 99 (unknown to the host) is retried with backoff, never fatal."""
    cp = h.ControlPlane()
    cp.default_policy = "approve"
    cp.policy["acc.echo.echo-0"] = ("reject_once", 99)
    async with hosted(ctx, 1, *h.FAST, cp=cp) as (cp, host):
        ok = await cp.wait_for(lambda: len(cp.live_keys()) == 1, 10)
        return ok, f"active after an unknown reject reason: {ok}; registers {len(cp.registers)}"


async def flood(ctx, transport):
    cp = h.ControlPlane()
    cp.ack_heartbeats = False
    async with hosted(ctx, 1, "--heartbeat-interval-ms", "1000", transport=transport, cp=cp, active=True) as (cp, host):
        s = cp.live()[0]
        await asyncio.sleep(0.5)
        before = rss_kib(host.proc.pid)
        big = "x" * (16 * 1024)
        sent = 0
        for i in range(24000):
            rid = f"{i:08d}{big}"
            s.send(execute_request=h.pb.ExecuteRequest(request_id=rid, payload=b"{}",
                                                       encoding=h.pb.PAYLOAD_ENCODING_JSON,
                                                       capability_id="no-such-capability"))
            sent += 1
            if i % 500 == 0:
                await asyncio.sleep(0)  # let the writer drain
        for _ in range(200):
            if s.out.empty():
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(2)
        after = rss_kib(host.proc.pid)
        growth = (after - before) / 1024
        alive = host.proc.poll() is None
        answered = len(cp.responses)
        return alive and growth < 64, f"{sent} requests with 16 KiB ids, no acks: RSS {before/1024:.0f} -> {after/1024:.0f} MiB (+{growth:.0f}, want < 64); answers seen {answered}; alive {alive}"


async def sc_flood_grpc(ctx):
    """never acks heartbeats, streams 24 000 requests with 16 KiB ids and an unknown capability: memory stays bounded (gRPC)."""
    return await flood(ctx, "grpc")


async def sc_flood_ws(ctx):
    """the same flood over WebSocket."""
    return await flood(ctx, "ws")


async def oversized(ctx, transport):
    async with hosted(ctx, 1, transport=transport, active=True) as (cp, host):
        s = cp.live()[0]
        cap = "\x01\x02\x1b" * (1024 * 1024 // 3)
        rid, fut = await s.execute(capability=cap, payload=b"{}")
        try:
            r = await asyncio.wait_for(fut, 15)
        except asyncio.TimeoutError:
            return False, "no answer in 15 s to a request whose error text would pass 4 MiB"
        ok = (not r.success) and r.request_id == rid and len(r.error) < 64 * 1024
        return ok, f"answered: success={r.success} kind={r.error_kind} error {len(r.error)} bytes"


async def sc_oversized_answer_grpc(ctx):
    """a 1 MB capability id of control characters: an error answer that fits, not silence (gRPC)."""
    return await oversized(ctx, "grpc")


async def sc_oversized_answer_ws(ctx):
    """the same over WebSocket."""
    return await oversized(ctx, "ws")


async def sc_forged_log_line(ctx):
    """a reject message with a newline, a forged log line and terminal escapes never reaches the output raw."""
    cp = h.ControlPlane()
    forged = "nope\n2026-01-01T00:00:00.000000Z  INFO connector_core: FORGED approved\x1b[31mred\x1b]0;title\x07"
    cp.default_policy = ("reject", h.pb.REJECT_REASON_DENIED)

    def on_register(s, reg):
        s.key = f"{reg.tenant_id}.{reg.connector_type}.{reg.instance_id}"
        cp.registers.append((0, s.key, s.peer, reg.session_token))
        s.send(register_response=h.pb.RegisterResponse(status=h.pb.REGISTRATION_STATUS_REJECTED,
                                                       reject_reason=h.pb.REJECT_REASON_DENIED, message=forged))
    cp.on_register = on_register
    async with hosted(ctx, 1, "--log", "info", cp=cp) as (cp, host):
        await cp.wait_for(lambda: len(cp.registers) >= 1, 10)
        await host.wait_exit(10)
        await host.stop()
        out = host.output()
        raw_esc = "\x1b" in out
        forged_line = any(l.startswith("2026-01-01T00:00:00.000000Z") for l in out.splitlines())
        return not raw_esc and not forged_line and "FORGED" in out, f"raw ESC in output: {raw_esc}; forged line at a line start: {forged_line}; message shown escaped: {'FORGED' in out}"


SCENARIOS = {
    "hostile-hb-interval": h.sc_hostile_hb_interval,
    "hostile-session-expired": sc_session_expired_forever,
    "hostile-duplicate": sc_duplicate_forever,
    "hostile-drain-forever": sc_drain_forever,
    "hostile-unknown-reject": sc_unknown_reject_reason,
    "hostile-flood-grpc": sc_flood_grpc,
    "hostile-flood-ws": sc_flood_ws,
    "hostile-oversized-grpc": sc_oversized_answer_grpc,
    "hostile-oversized-ws": sc_oversized_answer_ws,
    "hostile-forged-log": sc_forged_log_line,
}

if __name__ == "__main__":
    h.SCENARIOS.clear()
    h.SCENARIOS.update(SCENARIOS)
    sys.exit(h.main())
