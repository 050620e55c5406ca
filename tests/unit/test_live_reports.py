"""Live rollout pages: one watcher per rollout, whatever the number of viewers."""

from __future__ import annotations

import asyncio

from ota.web.live import LiveReports


def test_one_watcher_renders_each_change_once_for_every_viewer() -> None:
    prints = {"r-1": 1}
    renders: list[str] = []

    def render(rollout_id: str) -> str:
        renders.append(rollout_id)
        return f"{rollout_id} v{prints[rollout_id]}"

    async def scenario() -> None:
        live = LiveReports(
            store=None,  # type: ignore[arg-type]
            render=render,
            interval=0.01,
            refresh=3600,
            read_fingerprint=lambda rid: (prints[rid],),
        )
        with live.follow("r-1") as a, live.follow("r-1") as b:
            assert live.watching == 1
            # A new watcher renders once at once (the page may be older than its start),
            # then only on a change.
            assert await asyncio.wait_for(a.get(), 5) == await asyncio.wait_for(b.get(), 5)
            await asyncio.sleep(0.1)
            assert renders == ["r-1"]
            prints["r-1"] = 2
            first = await asyncio.wait_for(a.get(), 5)
            second = await asyncio.wait_for(b.get(), 5)
            assert first == second == "r-1 v2"
            assert renders == ["r-1", "r-1"]
            # A slow viewer holds only the newest rendering, never a backlog.
            prints["r-1"] = 3
            await asyncio.wait_for(a.get(), 5)
            prints["r-1"] = 4
            while renders.count("r-1") < 4:
                await asyncio.sleep(0.01)
            assert b.qsize() == 1 and b.get_nowait() == "r-1 v4"
        assert live.watching == 0

    asyncio.run(scenario())
