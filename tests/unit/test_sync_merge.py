"""Several login nodes: the merge rule, the outbox, adoption, [sync] parsing, and two
daemons built from parts sharing one real PostgreSQL server (pgserver.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import test_daemon_cycle as parts
from pgserver import Server, start
from policyfiles import DAEMON_SECTIONS, MAIN, write_policy

from pam_cgpolicy import cli
from pam_cgpolicy import sync as sync_mod
from pam_cgpolicy.badness import Change, UserScore
from pam_cgpolicy.compiled import read_penalty_entry
from pam_cgpolicy.errors import PolicyError, SyncError
from pam_cgpolicy.policy import Policy, Sync, load_policy
from pam_cgpolicy.state import Published, StateStore
from pam_cgpolicy.sync import Sharing, merge, wins
from pam_cgpolicy.syncdb import SyncDB

T0 = parts.T0
ORDER = ("penalty1", "penalty2")
BOB = parts.BOB


def pub(tier=None, expiry=None, occ=0, since=T0, released=None, origin="a"):
    return Published(BOB, "bob", tier, expiry, occ, since, released, origin)


# The merge rule


def test_an_expired_standing_loses_to_one_in_force():
    expired = pub("penalty2", T0 - 1, occ=5, since=T0 - 100)
    active = pub("penalty1", T0 + 100, occ=1, since=T0 - 200)
    assert wins(active, expired, T0, ORDER) and not wins(expired, active, T0, ORDER)


def test_then_the_higher_tier_then_more_occurrences_then_the_newer():
    low = pub("penalty1", T0 + 900, occ=3, since=T0)
    high = pub("penalty2", T0 + 100, occ=2, since=T0 - 50)
    assert wins(high, low, T0, ORDER)
    more = pub("penalty1", T0 + 100, occ=4, since=T0 - 50)
    assert wins(more, low, T0, ORDER)
    newer = pub("penalty1", T0 + 100, occ=3, since=T0 + 1)
    assert wins(newer, low, T0, ORDER) and not wins(low, newer, T0, ORDER)


def test_a_release_ends_penalties_begun_before_it_and_not_after():
    penalty = pub("penalty2", T0 + 900, occ=2, since=T0 - 10)
    release = pub(None, None, occ=2, since=T0, released=T0, origin="b")
    assert wins(release, penalty, T0, ORDER) and not wins(penalty, release, T0, ORDER)
    later = pub("penalty1", T0 + 900, occ=3, since=T0 + 5)
    assert wins(later, release, T0 + 6, ORDER)
    # an expiry is no release: it never ends another node's penalty
    expiry = pub(None, None, occ=2, since=T0)
    assert wins(penalty, expiry, T0, ORDER)


def test_merge_keeps_the_current_standing_when_no_entry_beats_it():
    current = pub("penalty2", T0 + 900, occ=2, origin="b")
    assert merge(current, [pub("penalty1", T0 + 900, occ=1)], T0, ORDER) is None
    entries = [pub("penalty1", T0 + 900, occ=1, since=T0 - 5), pub(None, None, 1, T0, T0)]
    assert merge(None, entries, T0, ORDER) == entries[1]


# The outbox


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    with StateStore.open(tmp_path / "state.db") as store:
        store.sharing = True
        yield store


def penalized(occ: int = 1) -> tuple[UserScore, Change]:
    state = UserScore(tier="penalty1", tier_expiry=T0 + 1800, occurrences=occ)
    return state, Change("penalized", None, "penalty1", occ - 1, occ, "cpu")


def test_own_tier_changes_enter_the_outbox_in_their_transaction(tmp_path, store):
    state, change = penalized()
    store.record(BOB, "bob", state, change, now=T0)
    released = UserScore(occurrences=1)
    store.record(
        BOB, "bob", released, Change("released", "penalty1", None, 1, 1, "by x"), "x", now=T0 + 1
    )
    store.record(BOB, "bob", released, Change("released", None, None, 1, 1, "expired"), now=T0 + 2)
    store.close()
    with StateStore.open(tmp_path / "state.db") as again:  # a restart loses none
        entries = [entry for _, entry in again.outbox()]
    assert entries == [
        Published(BOB, "bob", "penalty1", T0 + 1800, 1, T0, None),
        Published(BOB, "bob", None, None, 1, T0 + 1, T0 + 1),  # an admin's: a release
        Published(BOB, "bob", None, None, 1, T0 + 2, None),  # an expiry: no release
    ]


def test_adopted_watched_and_forgiven_changes_stay_out_of_the_outbox(store):
    state, change = penalized()
    store.record(BOB, "bob", state, change, "sync:login2", now=T0)
    store.record(BOB, "bob", state, Change("penalized", None, "penalty1", 0, 1, "w", True))
    store.record(BOB, "bob", UserScore(), Change("forgiven", None, None, 1, 0, "good"))
    assert store.outbox() == []


def test_a_single_node_keeps_no_outbox(store):
    store.sharing = False
    store.record(BOB, "bob", *penalized(), now=T0)
    assert store.outbox() == []


def test_published_empties_the_outbox_up_to_the_id_sent(store):
    store.record(BOB, "bob", *penalized(), now=T0)
    store.record(BOB, "bob", *penalized(2), now=T0 + 1)
    first, _second = store.outbox()
    store.published(first[0])
    assert [entry.occurrences for _, entry in store.outbox()] == [2]


# [sync] in the policy

SYNC = """
[sync]
host = "db.example.org"
database = "cgpolicy"
user = "cgpolicy"
password_file = "{secret}"
group = "login"
node = "login1"
sslmode = "verify-full"
"""


def secret(tmp_path: Path, mode: int = 0o600) -> Path:
    path = tmp_path / "db-password"
    path.write_text("pw\n")
    path.chmod(mode)
    return path


def test_a_valid_sync_table_loads_and_survives_the_saved_copy(tmp_path):
    path = secret(tmp_path)
    write_policy(tmp_path / "etc", MAIN + SYNC.format(secret=path))
    policy = load_policy(tmp_path / "etc")
    assert policy.sync == Sync(
        "db.example.org",
        "cgpolicy",
        "cgpolicy",
        "login",
        "login1",
        password_file=str(path),
        tls=(("sslmode", "verify-full"),),
    )
    assert Policy.from_data(policy.to_data()) == policy


def test_the_node_defaults_to_the_host_name(tmp_path):
    import socket

    text = SYNC.format(secret=secret(tmp_path)).replace('node = "login1"\n', "")
    write_policy(tmp_path / "etc", MAIN + text)
    assert load_policy(tmp_path / "etc").sync.node == socket.gethostname()


def test_each_bad_sync_setting_is_located(tmp_path):
    bad = (
        SYNC.format(secret=secret(tmp_path, 0o644))
        .replace('group = "login"', 'group = ""\nport = 0')
        .replace('node = "login1"', 'node = "../x"\nsslcolour = 1')
    )
    write_policy(tmp_path / "etc", MAIN + bad)
    with pytest.raises(PolicyError) as err:
        load_policy(tmp_path / "etc")
    found = [str(p) for p in err.value.problems]
    main = f"{tmp_path}/etc/cgpolicy.toml"
    line = len(MAIN.splitlines()) + 2  # [sync]'s own line
    assert any(p.startswith(f"{main}:{line + 4}: sync.password_file: ") for p in found), found
    assert f"{main}:{line + 5}: sync.group: must be given, without spaces" in found
    assert f"{main}:{line + 6}: sync.port: must be from 1 to 65535, not 0" in found
    assert any(p.startswith(f"{main}:{line + 7}: sync.node: '../x' is not") for p in found)
    assert any(p.startswith(f"{main}:{line + 8}: sync.sslcolour: unknown key") for p in found)


def test_no_sync_table_is_a_single_node(tmp_path):
    write_policy(tmp_path / "etc", MAIN)
    assert load_policy(tmp_path / "etc").sync is None


# Two nodes on one real server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from start(tmp_path_factory.mktemp("pg"))


def sync_section(server: Server, node: str, group: str, password_file: Path | None = None):
    return (
        f'\n[sync]\nhost = "{server.socket_dir}"\nport = {server.port}\ndatabase = "postgres"\n'
        f'user = "cgpolicy"\npassword_file = "{password_file or server.password_file}"\n'
        f'group = "{group}"\nnode = "{node}"\ntimeout = 2\n'
    )


class Pair:
    """Nodes login1 and login2 of one sync group, each a daemon built from parts."""

    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch, server: Server, group: str):
        self.nodes = {}
        self.daemons = {}
        for name in ("login1", "login2"):
            (tmp / name).mkdir()
            node = parts.Node(tmp / name, monkeypatch)
            write_policy(
                node.config, parts.ADMINS + DAEMON_SECTIONS + sync_section(server, name, group)
            )
            node.sampler.cores[BOB] = 0.1
            self.nodes[name] = node
            self.daemons[name] = node.daemon()
        self.errors: list[str] = []  # both nodes' log
        self.infos: list[str] = []
        monkeypatch.setattr(
            parts.daemon_mod.log, "error", lambda _k, t, **_w: self.errors.append(t)
        )
        monkeypatch.setattr(parts.daemon_mod.log, "info", lambda _k, t, **_w: self.infos.append(t))

    def share(self, name: str) -> None:
        asyncio.run(self.daemons[name].share())

    def tier(self, name: str) -> str | None:
        state = self.nodes[name].store.get(BOB)
        return state.tier if state else None

    def close(self) -> None:
        for name, daemon in self.daemons.items():
            if daemon.sharing:
                daemon.sharing.db.close()
            self.nodes[name].store.close()


@pytest.fixture
def pair(tmp_path, monkeypatch, server, request) -> Iterator[Pair]:
    pair = Pair(tmp_path, monkeypatch, server, request.node.name[:60])
    yield pair
    pair.close()


def test_a_penalty_on_one_node_is_in_force_on_the_other_and_a_release_ends_it(pair):
    one, two = pair.daemons["login1"], pair.daemons["login2"]
    asyncio.run(one.penalize("bob", "penalty2", "admin"))
    pair.share("login1")
    pair.share("login2")
    assert pair.tier("login2") == "penalty2"
    writer2 = pair.nodes["login2"].writer
    assert (
        writer2.last(BOB) == two.engine.limits(parts.ACCOUNTS[BOB], two.store.get(BOB)).properties
    )
    events = two.store.history(BOB)
    assert (events[0].kind, events[0].actor, events[0].new_occurrences) == (
        "penalized",
        "sync:login1",
        2,
    )
    assert two.store.outbox() == []  # not published back
    # login2's release ends it on login1
    asyncio.run(two.release("bob", "admin2"))
    pair.share("login2")
    pair.share("login1")
    assert pair.tier("login1") is None
    assert one.store.history(BOB)[0].actor == "sync:login2"
    assert one.store.get(BOB).occurrences == 2  # counted once, on login1


def test_a_penalty_begun_before_a_release_is_never_resurrected(pair):
    one, two = pair.daemons["login1"], pair.daemons["login2"]
    clock = pair.nodes["login1"].clock
    asyncio.run(one.penalize("bob", "penalty1", "admin"))  # login1 cannot publish it yet
    pair.nodes["login2"].clock.now = clock.now + 5
    asyncio.run(two.penalize("bob", "penalty1", "admin"))
    asyncio.run(two.release("bob", "admin2"))
    pair.share("login2")
    clock.now += 10
    pair.share("login1")  # login1's older penalty meets the release, and loses
    assert pair.tier("login1") is None
    pair.share("login2")
    assert pair.tier("login2") is None


def test_a_database_away_is_logged_once_and_the_outbox_waits(pair, server):
    one = pair.daemons["login1"]
    assert one.sharing is not None
    good = one.sharing.db
    one.sharing.db = SyncDB(
        Sync(server.socket_dir, "postgres", "cgpolicy", "x", "login1", port=1, timeout=2)
    )
    asyncio.run(one.penalize("bob", "penalty1", "admin"))
    errors = len(pair.errors)
    for _ in range(3):
        pair.share("login1")
    down = pair.errors[errors:]
    assert len(down) == 1 and "sync-down" in down[0] and "cannot connect" in down[0], down
    assert asyncio.run(one.status())["sync"] == "down"
    assert len(one.store.outbox()) == 1 and pair.tier("login1") == "penalty1"
    one.sharing.db = good
    pair.share("login1")
    assert any("sync-up" in line for line in pair.infos)
    assert one.store.outbox() == []
    pair.share("login2")
    assert pair.tier("login2") == "penalty1"


def test_a_wrong_password_is_a_clear_error(server, tmp_path):
    wrong = tmp_path / "pw"
    wrong.write_text("nope\n")
    wrong.chmod(0o600)
    db = SyncDB(
        Sync(
            server.socket_dir,
            "postgres",
            "cgpolicy",
            "g",
            "n",
            port=server.port,
            password_file=str(wrong),
            timeout=2,
        )
    )
    with pytest.raises(SyncError, match="password authentication failed for user"):
        db.exchange([], 0, T0, ORDER)


def test_doctor_checks_the_database_and_this_nodes_last_sync(pair, server):
    from dataclasses import replace

    from pam_cgpolicy.cli import _sync_check

    settings = pair.daemons["login1"].policy.sync
    assert settings is not None
    assert _sync_check(settings, 10)[0] == "warn"  # never synced yet
    pair.share("login1")
    verdict, what, text = _sync_check(settings, 10)
    assert (verdict, what) == ("ok", "sync database") and "node login1 last synced" in text
    verdict, _, text = _sync_check(replace(settings, port=1), 10)
    assert verdict == "FAIL" and "cannot connect" in text


def test_only_the_node_where_a_penalty_began_mails_it(pair, monkeypatch):
    monkeypatch.setattr(parts.daemon_mod, "facts_for", lambda *_a, **_k: "facts")
    told: dict[str, list[object]] = {"login1": [], "login2": []}
    for name, daemon in pair.daemons.items():
        monkeypatch.setattr(daemon.notifier, "notify", told[name].append)
    asyncio.run(pair.daemons["login1"].penalize("bob", "penalty1", "admin"))
    pair.share("login1")
    pair.share("login2")
    assert pair.tier("login2") == "penalty1"
    assert (len(told["login1"]), len(told["login2"])) == (1, 0)


def test_a_node_that_starts_sharing_publishes_the_penalties_it_holds(pair, server):
    one = pair.daemons["login1"]
    config = pair.nodes["login1"].config
    write_policy(config, parts.ADMINS + DAEMON_SECTIONS)  # login1 alone for now
    assert asyncio.run(one.reload("admin")) == []
    pair.share("login1")
    assert one.sharing is None
    asyncio.run(one.penalize("bob", "penalty2", "admin"))
    assert one.store.outbox() == []
    group = pair.daemons["login2"].policy.sync
    assert group is not None
    write_policy(
        config, parts.ADMINS + DAEMON_SECTIONS + sync_section(server, "login1", group.group)
    )
    assert asyncio.run(one.reload("admin")) == []
    pair.share("login1")  # its first share
    pair.share("login2")
    assert pair.tier("login2") == "penalty2"
    mine, theirs = one.store.get(BOB), pair.nodes["login2"].store.get(BOB)
    assert mine and theirs
    assert (theirs.tier_expiry, theirs.occurrences) == (mine.tier_expiry, mine.occurrences)
    # what login2 adopted is login1's: login2 never publishes it as its own
    assert pair.nodes["login2"].store.own_standings(pair.nodes["login2"].clock.now) == []


def test_two_running_nodes_of_one_name_are_told_once_a_restart_is_not(server, store, monkeypatch):
    told: list[tuple[str, str]] = []
    monkeypatch.setattr(sync_mod.log, "error", lambda kind, text, **_: told.append((kind, text)))
    monkeypatch.setattr(sync_mod.log, "info", lambda kind, text, **_: told.append((kind, text)))
    settings = Sync(
        server.socket_dir,
        "postgres",
        "cgpolicy",
        "one-name",
        "login1",
        port=server.port,
        password_file=str(server.password_file),
        timeout=2,
    )

    def node() -> Sharing:
        return Sharing(SyncDB(settings), "login1", "one-name")

    def share(*nodes: Sharing) -> None:
        for sharing in nodes:
            asyncio.run(sharing.share(store, T0, ORDER))

    first = node()
    share(first, first)
    second = node()  # a second login1, first still running
    for _ in range(3):
        share(second, first)
    assert [kind for kind, _ in told] == ["sync-duplicate", "sync-duplicate"]  # once each
    assert "another cgpolicyd" in told[0][1] and "shares as node login1" in told[0][1]
    status = first.status()
    assert status["sync_duplicate"] and status["sync"] == "ok"
    line = cli._sync_line(status, T0)
    assert line is not None and "another cgpolicyd" in line
    second.db.close()  # it stops; first takes the row back at its next share
    share(first, first)
    assert told[-1][0] == "sync-duplicate-gone" and first.status()["sync_duplicate"] is None
    first.db.close()
    del told[:]
    third = node()  # login1 restarted: a new instance takes the row over
    share(third, third, third)
    assert told == [] and third.status()["sync_duplicate"] is None
    third.db.close()


def test_status_shows_the_group_the_node_and_the_last_sync(pair, server):
    one = pair.daemons["login1"]
    assert one.sharing is not None
    group = one.sharing.group
    assert cli._sync_line({"policy": "files"}, T0) is None  # no [sync]
    now = pair.nodes["login1"].clock.now
    assert cli._sync_line(asyncio.run(one.status()), now) == (
        f"sync: group {group}, node login1: up, last sync never"
    )
    pair.share("login1")
    assert cli._sync_line(asyncio.run(one.status()), now + 4) == (
        f"sync: group {group}, node login1: up, last sync 4s ago"
    )
    good = one.sharing.db
    one.sharing.db = SyncDB(
        Sync(server.socket_dir, "postgres", "cgpolicy", "x", "login1", port=1, timeout=2)
    )
    pair.share("login1")
    line = cli._sync_line(asyncio.run(one.status()), now + 4)
    assert line is not None
    assert line.startswith(f"sync: group {group}, node login1: down, enforcing locally (")
    assert "cannot connect" in line and line.endswith("; last sync 4s ago")
    one.sharing.db.close()
    one.sharing.db = good


def test_a_watching_node_neither_publishes_nor_enforces_until_it_enforces(pair, server):
    one, two = pair.daemons["login1"], pair.daemons["login2"]
    config, group = pair.nodes["login2"].config, pair.daemons["login2"].policy.sync
    assert group is not None

    def mode(text: str) -> None:
        sections = DAEMON_SECTIONS.replace("[penalty]\n", f'[penalty]\nmode = "{text}"\n')
        write_policy(config, parts.ADMINS + sections + sync_section(server, "login2", group.group))
        assert asyncio.run(two.reload("admin")) == []

    mode("watch")
    writer = pair.nodes["login2"].writer
    before = writer.last(BOB)
    asyncio.run(one.penalize("bob", "penalty2", "admin"))
    pair.share("login1")
    pair.share("login2")
    assert pair.tier("login2") == "penalty2" and two.store.history(BOB)[0].watched
    assert writer.last(BOB) == before  # adopted, recorded, not enforced
    now = pair.nodes["login2"].clock.now
    assert read_penalty_entry(str(pair.nodes["login2"].penalties), BOB, now) is None
    asyncio.run(one.release("bob", "admin"))
    pair.share("login1")
    pair.share("login2")
    # login2's model penalizes bob, watched: kept from the group
    state, change = penalized()
    two.store.record(BOB, "bob", state, replace(change, watched=True), now=now + 1)
    pair.share("login2")
    pair.share("login1")
    assert pair.tier("login1") is None
    mode("enforce")  # now it enforces bob's tier: the group gets it
    pair.share("login2")
    pair.share("login1")
    assert pair.tier("login1") == "penalty1"


def test_doctor_says_what_cgpolicyd_says_of_its_sync(monkeypatch):
    status = {
        "policy": "files",
        "started": T0,
        "sync": "down",
        "sync_error": "db:5432/cgpolicy: cannot connect: refused",
        "sync_duplicate": "another cgpolicyd (instance 1a2b) shares as node login1 in group g",
    }
    monkeypatch.setattr(cli, "_on_bus", lambda _work: status)
    checks = [c for c in cli._daemon_checks(salvage_shown=False) if c[1] == "cgpolicyd sync"]
    assert checks == [
        (
            "warn",
            "cgpolicyd sync",
            "the sync database is away, enforcing locally: "
            "db:5432/cgpolicy: cannot connect: refused",
        ),
        ("FAIL", "cgpolicyd sync", status["sync_duplicate"]),
    ]


def test_an_admins_change_is_shared_as_it_is_made_not_at_the_cycles_end(pair):
    one = pair.daemons["login1"]
    assert one.policy.general.interval >= 10  # the test waits far less than one interval

    async def resting_then_penalize() -> list:
        stop = asyncio.Event()
        running = asyncio.create_task(one.run(stop))
        await asyncio.sleep(0.5)  # the first cycle and its share are done: it rests
        await one.penalize("bob", "penalty2", "admin")
        for _ in range(40):
            await asyncio.sleep(0.1)
            if not one.store.outbox():
                break
        left = one.store.outbox()
        stop.set()
        await running
        return left

    assert asyncio.run(resting_then_penalize()) == []  # published while it rested
    pair.share("login2")
    assert pair.tier("login2") == "penalty2"
