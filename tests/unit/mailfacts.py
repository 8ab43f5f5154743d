"""One penalty's mail facts, as the mail tests share them."""

from __future__ import annotations

from pam_cgpolicy.mail import MailFacts, Process

T0 = 1_800_000_000.0
FACTS = MailFacts(
    user="bob",
    uid=2002,
    host="login1",
    kind="penalized",
    tier="penalty1",
    message="Your CPU use was heavy: your limits are lower for a while",
    limits="CPUQuota=80% MemoryMax=1.6G",
    expiry=T0 + 1800,
    reason="badness 100.4 >= 100: cpu 80.2, memory 20.2",
    actor=None,
    cpu_threshold=0.8,
    memory_threshold=0.5,
    processes=(
        Process(4242, "python3", "/usr/bin/python3.11", 3.97, 512 * 1024**2),
        Process(4243, "<b>x</b>", "/home/bob/a.out", 0.5, 1024),
    ),
    when=T0,
)
