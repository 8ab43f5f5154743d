from pam_cgpolicy.setprops import busctl_argv


def test_busctl_argv_is_one_runtime_set_unit_properties_call():
    argv = busctl_argv(
        2002,
        [
            ("CPUAccounting", "b", True),
            ("CPUQuotaPerSecUSec", "t", 500000),
            ("TasksMaxScale", "u", 429496729),
            ("AllowedCPUs", "ay", b"\x0f\x01"),
        ],
        timeout=1.5,
    )
    assert argv[0].endswith("/busctl")
    assert argv[1:] == [
        "--system",
        "--quiet",
        "--timeout=1.500s",
        "call",
        "org.freedesktop.systemd1",
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
        "SetUnitProperties",
        "sba(sv)",
        "user-2002.slice",
        "true",
        "4",
        "CPUAccounting",
        "b",
        "true",
        "CPUQuotaPerSecUSec",
        "t",
        "500000",
        "TasksMaxScale",
        "u",
        "429496729",
        "AllowedCPUs",
        "ay",
        "2",
        "15",
        "1",
    ]


def test_only_user_slices():
    import pytest

    for uid in (0, -1, True, "1000"):
        with pytest.raises(ValueError):
            busctl_argv(uid, [], 1.0)


def test_concurrent_calls_each_wait_for_their_own_busctl(tmp_path, monkeypatch):
    """The daemon sets limits from several threads: no call may reap another's child."""
    from concurrent.futures import ThreadPoolExecutor

    from pam_cgpolicy import setprops

    fake = tmp_path / "busctl"
    fake.write_text("#!/bin/sh\nsleep 0.2\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setattr(setprops, "BUSCTL_PATHS", (str(fake),))
    with ThreadPoolExecutor(4) as pool:
        calls = [
            pool.submit(
                setprops.set_slice_properties, 2002 + n, [("CPUQuotaPerSecUSec", "t", 1)], 1.0
            )
            for n in range(8)
        ]
        for call in calls:
            call.result()  # ChildProcessError here if one reaped another's busctl


def _open_fds():
    import os

    return len(os.listdir("/proc/self/fd"))


def _children():
    import os

    pid, count = os.getpid(), 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as children:
            count += len(children.read().split())
    return count


def test_a_thousand_failures_of_each_kind_leak_no_fd_and_no_process(tmp_path, monkeypatch):
    """Each failure is a SystemdError the caller can log and retry; nothing stays open."""
    import errno
    import gc
    import os

    import pytest

    from pam_cgpolicy import setprops
    from pam_cgpolicy.errors import SystemdError

    refusing = tmp_path / "busctl"
    refusing.write_text("#!/bin/sh\necho 'Access denied' >&2\nexit 1\n")
    refusing.chmod(0o755)

    def spawn_fails(code):
        def fail(*args, **kwargs):
            raise OSError(code, os.strerror(code))

        return fail

    kinds = {
        "missing": {"BUSCTL_PATHS": (str(tmp_path / "none"),)},
        "EAGAIN": {"BUSCTL_PATHS": (str(refusing),), "os.posix_spawn": errno.EAGAIN},
        "ENOMEM": {"BUSCTL_PATHS": (str(refusing),), "os.posix_spawn": errno.ENOMEM},
        "refused": {"BUSCTL_PATHS": (str(refusing),)},
    }
    gc.collect()  # what earlier tests left for the collector is closed before counting
    fds, children = _open_fds(), _children()
    for kind, patches in kinds.items():
        with monkeypatch.context() as patch:
            patch.setattr(setprops, "BUSCTL_PATHS", patches["BUSCTL_PATHS"])
            if "os.posix_spawn" in patches:
                patch.setattr(setprops.os, "posix_spawn", spawn_fails(patches["os.posix_spawn"]))
            for _ in range(1000):
                with pytest.raises(SystemdError):
                    setprops.set_slice_properties(2002, [("CPUQuotaPerSecUSec", "t", 1)], 1.0)
        gc.collect()
        assert (_open_fds(), _children()) == (fds, children), kind
