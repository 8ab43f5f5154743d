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
    service: str,
    pam_dir: Path = PAM_DIR,
    _seen: frozenset[str] = frozenset(),
    kind: str = "session",
) -> list[SessionLine]:
    """The service's ``kind`` lines (session, auth) in the order PAM runs them, includes in."""
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
            stack += session_stack(words[1], pam_dir, _seen | {service}, kind)
        elif words[0].lstrip("-") == kind and len(words) >= 3:
            control, module = words[1], words[2]
            if control in ("include", "substack"):
                stack += session_stack(module, pam_dir, _seen | {service}, kind)
            else:
                stack.append(SessionLine(str(path), number, control, module, tuple(words[3:])))
    return stack


def _module_name(line: SessionLine) -> str:
    return Path(line.module).name


def _hook_index(stack: list[SessionLine], hook: str) -> int | None:
    return next(
        (
            i
            for i, s in enumerate(stack)
            if _module_name(s) == "pam_exec.so" and any(hook in a for a in s.args)
        ),
        None,
    )


def _imports_user_env(line: SessionLine) -> bool:
    """pam_env reading the user's own file (~/.pam_environment or user_envfile=)."""
    if _module_name(line) != "pam_env.so":
        return False
    readenv = [a.partition("=")[2] for a in line.args if a.startswith("user_readenv=")]
    return bool(readenv) and readenv[-1].strip() not in ("", "0")


def user_env_before_hook(service: str, hook: str, pam_dir: Path = PAM_DIR) -> list[SessionLine]:
    """The lines that fill the PAM environment from a user's file before the hook runs.

    The auth stack's credentials step (pam_setcred) runs before any session module.
    """
    session = session_stack(service, pam_dir)
    hook_at = _hook_index(session, hook)
    before = session_stack(service, pam_dir, kind="auth") + session[: hook_at or 0]
    return [line for line in before if _imports_user_env(line)]


def hook_wiring(service: str, hook: str, pam_dir: Path = PAM_DIR) -> tuple[bool, str]:
    """Whether ``hook`` runs in the session stack after pam_systemd, and what was found."""
    stack = session_stack(service, pam_dir)
    systemd_at = next((i for i, s in enumerate(stack) if _module_name(s) == "pam_systemd.so"), None)
    hook_at = _hook_index(stack, hook)
    if hook_at is None:
        return False, f"no 'session ... pam_exec.so ... {hook}' line in the {service} stack"
    where = f"{stack[hook_at].file}:{stack[hook_at].line}"
    if systemd_at is None:
        return False, f"hook at {where}, but the {service} stack has no pam_systemd.so"
    if hook_at < systemd_at:
        return False, f"hook at {where} runs before pam_systemd.so: the slice may not exist yet"
    if stack[hook_at].control not in ("optional", "[default=ignore]"):
        return False, f"hook at {where} is '{stack[hook_at].control}': make it 'optional'"
    if "stdout" not in stack[hook_at].args:
        return True, f"hook at {where}, after pam_systemd.so; without stdout: no login message"
    return True, f"hook at {where}, after pam_systemd.so"
