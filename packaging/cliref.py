"""Writes cgpolicyctl(8) and cgpolicyctl's bash completion from its argument parser.

    python3 packaging/cliref.py OUTDIR    ->  OUTDIR/cgpolicyctl.8, OUTDIR/cgpolicyctl.bash

The parser is the one fact about the commands and their options: the man page
and the completion are made from it at package build time, so neither can
fall behind. Commands without a help text (`tiers`, which completion asks)
are left out of both lists.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pam_cgpolicy import cli  # noqa: E402

SEE_ALSO = ["cgpolicyd(8)", "cgpolicy-pam-hook(8)", "cgpolicy.toml(5)", "org.cgpolicy1(5)"]
FILES = [
    ("/etc/cgpolicy/cgpolicy.toml", "the main policy file; see cgpolicy.toml(5)"),
    ("/etc/cgpolicy/groups.d/*.toml", "one file per status group"),
    ("/var/lib/cgpolicy", "cgpolicyd's state and the compiled policy; root's alone"),
    ("/var/lib/cgpolicy/checkpoints/ID", "an evicted job's images and CRIU's logs (evict)"),
]


def roff(text: str) -> str:
    """Text safe in a roff line: backslashes and minus signs escaped, no control dot."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text.startswith((".", "'")) else text


def commands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help, parser) of each documented subcommand, in the parser's order."""
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help or "" for choice in sub._choices_actions}
    return [(name, helps[name], p) for name, p in sub.choices.items() if name in helps]


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


def positionals(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        a
        for a in parser._actions
        if not a.option_strings and not isinstance(a, argparse._SubParsersAction)
    ]


def synopsis(name: str, parser: argparse.ArgumentParser) -> str:
    words = [f"\\fB{roff(name)}\\fR"]
    for action in options(parser):
        flag = roff(action.option_strings[-1])
        value = f" \\fI{action.metavar or action.dest.upper()}\\fR" if action.nargs != 0 else ""
        word = f"\\fB{flag}\\fR{value}"
        words.append(word if action.required else f"[{word}]")
    for action in positionals(parser):
        word = f"\\fI{roff(str(action.metavar or action.dest).upper())}\\fR"
        word += " ..." if action.nargs == "+" else ""
        words.append(f"[{word}]" if action.nargs == "?" else word)
    return " ".join(words)


def version() -> str:
    with open(ROOT / "pyproject.toml", "rb") as file:
        return str(tomllib.load(file)["project"]["version"])


def man_page(parser: argparse.ArgumentParser) -> str:
    # The build's own date where it sets one, so the same tree gives the same page.
    stamp = time.gmtime(int(os.environ.get("SOURCE_DATE_EPOCH", time.time())))
    doc = (cli.__doc__ or "").strip().split("\n\n")
    lines = [
        f'.TH CGPOLICYCTL 8 {time.strftime("%Y-%m-%d", stamp)} "cgpolicy {version()}"'
        ' "System Administration"',
        ".SH NAME",
        "cgpolicyctl \\- " + roff(parser.description or "").split(": ", 1)[-1].rstrip("."),
        ".SH SYNOPSIS",
        synopsis("cgpolicyctl", parser) + " \\fICOMMAND\\fR [\\fIARGUMENTS\\fR]",
        ".SH DESCRIPTION",
    ]
    for paragraph in doc[1:]:
        if paragraph.startswith("Exit codes"):
            continue
        lines += [roff(line) for line in paragraph.splitlines()] + [".PP"]
    lines[-1:] = [".SH OPTIONS"]
    for action in options(parser):
        value = f" \\fI{action.metavar or action.dest.upper()}\\fR" if action.nargs != 0 else ""
        flag = roff(action.option_strings[-1])
        lines += [".TP", f"\\fB{flag}\\fR{value}", roff(action.help or "")]
    lines.append(".SH COMMANDS")
    for name, help_text, command in commands(parser):
        lines += [".TP", synopsis(name, command), roff(help_text) + "."]
        for action in options(command):
            flag = roff(action.option_strings[-1])
            lines += [".RS", ".TP", f"\\fB{flag}\\fR", roff(action.help or ""), ".RE"]
    lines += [
        ".SH EXIT STATUS",
        "0 on success, 1 when the action failed or the policy is invalid (with a message"
        " on standard error), 2 on a usage error.",
        ".SH FILES",
    ]
    for path, what in FILES:
        lines += [".TP", f"\\fI{roff(path)}\\fR", roff(what)]
    lines += [".SH SEE ALSO", ",\n".join(f".BR {page.replace('(', ' (')}" for page in SEE_ALSO)]
    return "\n".join(lines) + "\n"


def completion(parser: argparse.ArgumentParser) -> str:
    """A bash completion: commands, their options, user names, and tier names from the policy."""
    cases = []
    for name, _, command in commands(parser):
        flags = " ".join(f for a in options(command) for f in a.option_strings)
        args = [str(a.dest) for a in positionals(command)]
        cases.append(f'        {name}) flags="{flags}"; args="{" ".join(args)}" ;;')
    names = " ".join(name for name, _, _ in commands(parser))
    top = " ".join(f for a in options(parser) for f in a.option_strings)
    return f"""# bash completion for cgpolicyctl; written by packaging/cliref.py from its parser.
_cgpolicyctl() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} prev=${{COMP_WORDS[COMP_CWORD-1]}}
    local i word command="" config=() nth=0 flags args
    if [ "$prev" = --config-dir ] || [ "$prev" = --out ] || [ "$prev" = --policy ]; then
        COMPREPLY=($(compgen -d -- "$cur"))
        return
    fi
    if [ "$prev" = --history ] || [ "$prev" = --plot ]; then
        COMPREPLY=($(compgen -f -- "$cur"))
        return
    fi
    for ((i = 1; i < COMP_CWORD; i++)); do
        word=${{COMP_WORDS[i]}}
        if [ "$word" = --config-dir ]; then
            config=(--config-dir "${{COMP_WORDS[i+1]}}")
            ((i++))
        elif [ -z "$command" ] && [ "${{word#-}}" = "$word" ]; then
            command=$word
        elif [ -n "$command" ] && [ "${{word#-}}" = "$word" ]; then
            ((nth++))
        fi
    done
    if [ -z "$command" ]; then
        COMPREPLY=($(compgen -W "{names} {top} --help" -- "$cur"))
        return
    fi
    case $command in
{chr(10).join(cases)}
        *) return ;;
    esac
    if [ "${{cur#-}}" != "$cur" ]; then
        COMPREPLY=($(compgen -W "$flags --help" -- "$cur"))
        return
    fi
    set -- $args
    shift "$nth" 2>/dev/null || return
    case $1 in
        user) COMPREPLY=($(compgen -u -- "$cur")) ;;
        config) COMPREPLY=($(compgen -f -- "$cur")) ;;
        tier) COMPREPLY=($(compgen -W "$(cgpolicyctl "${{config[@]}}" tiers 2>/dev/null)" \\
            -- "$cur")) ;;
    esac
}}
complete -F _cgpolicyctl cgpolicyctl
"""


def main() -> int:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    parser = cli.build_parser()
    (out / "cgpolicyctl.8").write_text(man_page(parser))
    (out / "cgpolicyctl.bash").write_text(completion(parser))
    return 0


if __name__ == "__main__":
    sys.exit(main())
