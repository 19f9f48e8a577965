"""`--help` matches what is built: every command's help works and lists only commands that exist, and the
README's command table names exactly the commands there are (and only options they take)."""

from __future__ import annotations

import re
from pathlib import Path

import click
from click.testing import CliRunner

from loramill.cli import main

README = Path(__file__).resolve().parents[2] / "README.md"


def _commands(group: click.Group, path: tuple[str, ...] = ()):
    """(path, command) for every visible command under `group`, groups included."""
    for name, command in group.commands.items():
        if command.hidden:
            continue
        yield (*path, name), command
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))


def _listed(help_text: str) -> list[str]:
    """The names in a help page's `Commands:` section."""
    if "Commands:" not in help_text:
        return []
    section = help_text.split("Commands:", 1)[1]
    return [line.split()[0] for line in section.splitlines() if line.startswith("  ") and line.split()]


def test_every_help_page_works_and_lists_only_real_commands():
    pages = [((), main), *_commands(main)]
    for path, command in pages:
        result = CliRunner().invoke(main, [*path, "--help"], terminal_width=200)
        assert result.exit_code == 0, (path, result.output)
        assert f"Usage: main {' '.join(path)}".rstrip() in result.output or "Usage:" in result.output
        listed = _listed(result.output)
        if isinstance(command, click.Group):
            visible = sorted(n for n, c in command.commands.items() if not c.hidden)
            assert sorted(listed) == visible, path
        else:
            assert listed == []


def _readme_commands() -> dict[tuple[str, ...], list[str]]:
    """The README's `## Command line` table: each `loramill ...` it names -> the options written beside it."""
    text = README.read_text()
    table = text.split("## Command line", 1)[1].split("\n## ", 1)[0]
    found: dict[tuple[str, ...], list[str]] = {}
    for row in (line for line in table.splitlines() if line.startswith("| `loramill")):
        first_cell = row.split(" | ")[0]
        for usage in re.findall(r"`loramill ([^`]*)`", first_cell):
            words = usage.replace("\\|", "|").split()
            path: list[list[str]] = []
            for word in words:
                if word.startswith(("-", "[")) or word.isupper() or not re.fullmatch(r"[a-z][a-z|-]*", word):
                    break
                path.append(word.split("|"))
            options = re.findall(r"(--[a-z][a-z-]*)", usage)
            prefixes = [()]
            for alternatives in path:
                prefixes = [(*p, a) for p in prefixes for a in alternatives]
            for prefix in prefixes:
                found[prefix] = options
    return found


def test_the_readme_command_table_names_the_commands_there_are():
    documented = _readme_commands()
    leaves = {path for path, command in _commands(main) if not isinstance(command, click.Group)}
    # a group is documented through its subcommands (`tenant key create|list|revoke`)
    assert set(documented) == leaves, (sorted(set(documented) - leaves), sorted(leaves - set(documented)))
    for path, options in documented.items():
        command = main
        for name in path:
            command = command.commands[name]
        takes = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
        assert set(options) <= takes, (path, sorted(set(options) - takes))
