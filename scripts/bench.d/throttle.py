#!/usr/bin/env python3
"""throttle.py LISTEN_PORT TARGET_PORT RATE: a TCP proxy on 127.0.0.1 that limits the
client-to-server direction to RATE bytes/s over all connections together, as an uplink
to a bucket would. Used by scripts/bench for the cold build into a bucket."""
import asyncio, sys, time
listen, target, rate = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
lock = asyncio.Lock()
state = {"t": time.monotonic()}

# A sender is let through by schedule, not by the time it comes back: the time
# between one read and the next (proxy overhead, sleep overshoot) is made up by
# later reads instead of being lost, so the link runs at RATE and not below it. An
# idle link banks at most BURST seconds of sending.
BURST = 0.05

async def pace(n):
    async with lock:
        now = time.monotonic()
        start = max(now - BURST, state["t"])
        state["t"] = start + n / rate
        delay = state["t"] - now
    if delay > 0:
        await asyncio.sleep(delay)

async def pipe(r, w, limited):
    try:
        while True:
            data = await r.read(64 << 10)
            if not data:
                break
            if limited:
                await pace(len(data))
            w.write(data)
            await w.drain()
    except Exception:
        pass
    finally:
        try:
            w.close()
        except Exception:
            pass

async def handle(cr, cw):
    try:
        sr, sw = await asyncio.open_connection("127.0.0.1", target)
    except Exception:
        cw.close()
        return
    await asyncio.gather(pipe(cr, sw, True), pipe(sr, cw, False))

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()

asyncio.run(main())
