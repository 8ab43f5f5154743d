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
