"""Reading the PAM configuration: is the hook wired into a service's session stack?"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PAM_DIR = Path("/etc/pam.d")


@dataclass(frozen=True)
class SessionLine:
    file: str
    line: int
    control: str
    module: str
    args: tuple[str, ...]


def session_stack(
    service: str, pam_dir: Path = PAM_DIR, _seen: frozenset[str] = frozenset()
) -> list[SessionLine]:
    """The service's session lines in the order PAM runs them, includes expanded."""
    if service in _seen:
        return []
    path = pam_dir / service
    try:
        text = path.read_text()
    except OSError:
        return []
    stack: list[SessionLine] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        if words[0] == "@include" and len(words) > 1:
            stack += session_stack(words[1], pam_dir, _seen | {service})
        elif words[0].lstrip("-") == "session" and len(words) >= 3:
            control, module = words[1], words[2]
            if control in ("include", "substack"):
                stack += session_stack(module, pam_dir, _seen | {service})
            else:
                stack.append(SessionLine(str(path), number, control, module, tuple(words[3:])))
    return stack


def _module_name(line: SessionLine) -> str:
    return Path(line.module).name


def hook_wiring(service: str, hook: str, pam_dir: Path = PAM_DIR) -> tuple[bool, str]:
    """Whether ``hook`` runs in the session stack after pam_systemd, and what was found."""
    stack = session_stack(service, pam_dir)
    systemd_at = next((i for i, s in enumerate(stack) if _module_name(s) == "pam_systemd.so"), None)
    hook_at = next(
        (
            i
            for i, s in enumerate(stack)
            if _module_name(s) == "pam_exec.so" and any(hook in a for a in s.args)
        ),
        None,
    )
    if hook_at is None:
        return False, f"no 'session ... pam_exec.so ... {hook}' line in the {service} stack"
    where = f"{stack[hook_at].file}:{stack[hook_at].line}"
    if systemd_at is None:
        return False, f"hook at {where}, but the {service} stack has no pam_systemd.so"
    if hook_at < systemd_at:
        return False, f"hook at {where} runs before pam_systemd.so: the slice may not exist yet"
    if stack[hook_at].control not in ("optional", "[default=ignore]"):
        return False, f"hook at {where} is '{stack[hook_at].control}': make it 'optional'"
    return True, f"hook at {where}, after pam_systemd.so"
