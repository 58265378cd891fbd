"""The demo's overload signals: the protected shop's door sheds by its line, event-loop lag and CPU with
thresholds per priority (LOW first), records why, and each run starts one sampler and stops it.

The door is driven by `shedder.sample()` (no sampler, no clock): which try is shed depends on the test
alone."""
import asyncio

import pytest

from buttress import Overloaded, Priority
from buttress.demo import checkout, deps
from buttress.demo.checkout import Arrival, header_retry_after, priority_of


def _door(workers=64):
    depth = [0]
    tally = checkout.Tally()
    policies = checkout.Policies(1, (deps.DependencyError,), tally, lambda: 0.0, line=lambda: depth[0],
                                 workers=workers)
    return checkout.Protected(None, policies), policies, tally, depth


def _guest_and_member():
    orders = [Arrival(0.0, f"{i:05d}", "item-1") for i in range(1, 50)]
    guest = next(a for a in orders if priority_of(1, a, 1) is Priority.LOW)
    member = next(a for a in orders if priority_of(1, a, 1) is Priority.MEDIUM)
    return guest, member


async def _through(shop, a, tries):
    """One try through the door: 'in' when admitted, else the refusal."""
    try:
        async with shop.door(a, tries):
            return "in"
    except Overloaded as exc:
        return exc


def test_priorities_guest_first_try_low_member_medium_a_user_coming_back_high():
    orders = [Arrival(0.0, f"{i:05d}", "item-1") for i in range(1, 201)]
    first = [priority_of(1, a, 1) for a in orders]
    assert first == [priority_of(1, a, 1) for a in orders]         # the seed's, per order
    assert set(first) == {Priority.LOW, Priority.MEDIUM}
    assert 60 <= first.count(Priority.LOW) <= 140                    # about half are guests
    assert {priority_of(1, a, n) for a in orders for n in (2, 3)} == {Priority.HIGH}


@pytest.mark.parametrize("line, shed", [(0, set()), (15, set()), (16, {"LOW"}), (31, {"LOW"}),
                                        (32, {"LOW", "MEDIUM"}), (64, {"LOW", "MEDIUM", "HIGH"}),
                                        (10_000, {"LOW", "MEDIUM", "HIGH"})])
def test_the_door_sheds_by_the_line_low_first(line, shed):
    """64 workers: LOW is shed from a line of 16, MEDIUM from 32, HIGH from 64 (docs/demo.md says why)."""
    shop, policies, tally, depth = _door()
    guest, member = _guest_and_member()
    depth[0] = line
    policies.shedder.sample()

    async def tries():
        return {"LOW": await _through(shop, guest, 1), "MEDIUM": await _through(shop, member, 1),
                "HIGH": await _through(shop, guest, 2)}

    got = asyncio.run(tries())
    assert {p for p, r in got.items() if r != "in"} == shed
    for p in shed:
        exc = got[p]
        assert exc.retry_after == checkout.SAMPLE_INTERVAL and header_retry_after(exc.retry_after) == 1
        assert "queue_depth" in str(exc)
    assert dict(tally.shed_by) == {("queue_depth", p): 1 for p in shed}
    assert policies.shedder.in_flight == 0


def test_the_door_scales_the_line_thresholds_with_the_workers():
    shop, policies, tally, depth = _door(workers=8)       # LOW from 2, MEDIUM from 4, HIGH from 8
    guest, member = _guest_and_member()
    depth[0] = 4
    policies.shedder.sample()
    got = asyncio.run(_through(shop, member, 1)), asyncio.run(_through(shop, guest, 2))
    assert isinstance(got[0], Overloaded) and got[1] == "in"


def test_between_samples_the_in_flight_count_is_the_backstop():
    """Capacity 4 x workers: with 2 workers, a LOW try is admitted while fewer than 4 are in the shop."""
    shop, policies, tally, depth = _door(workers=2)
    guest, _ = _guest_and_member()

    async def scenario():
        held = [shop.door(guest, 1) for _ in range(4)]
        for door in held:
            await door.__aenter__()
        refused = await _through(shop, guest, 1)
        for door in held:
            await door.__aexit__(None, None, None)
        return refused

    refused = asyncio.run(scenario())
    assert isinstance(refused, Overloaded)
    assert dict(tally.shed_by) == {("in_flight", "LOW"): 1}
    assert policies.shedder.in_flight == 0


def test_a_failing_checkout_gives_its_door_slot_back():
    shop, policies, _, _ = _door()
    guest, _ = _guest_and_member()

    async def scenario():
        with pytest.raises(deps.DependencyError):
            async with shop.door(guest, 1):
                raise deps.DependencyError("payment")

    asyncio.run(scenario())
    assert policies.shedder.in_flight == 0


def test_each_run_starts_one_sampler_on_its_loop_and_stops_it(monkeypatch):
    started, stopped = [], []

    class Counting(checkout.LoadShedder):
        def start(self):
            started.append((self.name, asyncio.get_running_loop()))
            super().start()

        def stop(self):
            stopped.append(self.name)
            super().stop()

    monkeypatch.setattr(checkout, "LoadShedder", Counting)
    cfg = checkout.RunConfig(seed=1, rate=20.0, duration=0.5, drain=0.3, patience=0.5, workers=64)
    schedule = checkout.arrivals(1, cfg.rate, cfg.duration)
    faults = deps.Faults.draw(1, cfg.duration)

    async def both():
        out = {}
        async with checkout.InProcess() as backend:
            for kind in ("naive", "protected"):
                out[kind] = await checkout.run(kind, schedule, backend, faults, cfg)
        return out

    records = asyncio.run(both())
    assert [name for name, _ in started] == ["naive-monitor", "shop"] and stopped == ["naive-monitor", "shop"]
    for kind, record in records.items():
        assert set(record["signals"]) == {"loop_lag", "cpu", "queue_depth"}
        assert all(sig["peak"] >= 0 for sig in record["signals"].values())
    assert records["naive"]["shedder"] is None
    door = records["protected"]["shedder"]
    assert sum(door["admitted"].values()) >= len(schedule)           # every arrival tried the door at least once
    assert sum(n for by in door["shed_by"].values() for n in by.values()) == sum(door["shed"].values())
