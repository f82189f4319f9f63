"""Every `python -m helpers.…` and `python -m app.app` command the README and the app's README show
parses as written: its subcommand and flags exist and its values have their flags' types (the command
is parsed by the module's own parser, argparse or jsonargparse, then stopped)."""
from __future__ import annotations

import argparse
import importlib
import json
import re
import shlex
from pathlib import Path

import jsonargparse
import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "app" / "README.md"]
COMMAND = re.compile(r"python -m ((?:helpers|app)\.\w+)((?:[ ]+(?!#)[^\s`|]+)*)")
PLACEHOLDER = "X"  # stands for "..." in a shown command
CONFIG_FILE = re.compile(r"<\w+>/config\.json")  # the config file helpers.runtime writes into a run folder


class Parsed(Exception):
    pass


def _commands_in(text: str) -> list[tuple[str, list[str]]]:
    found = []
    for match in COMMAND.finditer(text):
        args = []
        for a in shlex.split(match.group(2)):  # "..." is a flag's value after a flag, else "more flags"
            if a != "...":
                args.append(a)
            elif args and args[-1].startswith("--"):
                args.append(PLACEHOLDER)
        args = [a for a in args if not (a.startswith("[") or a.endswith("]"))]  # optional parts
        found.append((match.group(1), args))
    return found


def shown_commands() -> list[tuple[str, str, list[str]]]:
    """(doc, module, args): each line of a fenced block, and each inline code span with arguments
    (a bare `python -m helpers.x` in prose names the module; `--help` only prints)."""
    found = []
    for doc in DOCS:
        parts = doc.read_text().split("```")
        for k, part in enumerate(parts):
            if k % 2:  # a fenced code block: one command a line
                commands = [c for line in part.splitlines() for c in _commands_in(line)]
            else:
                spans = [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", part)]
                commands = [c for span in spans for c in _commands_in(span) if c[1]]
            found += [(str(doc.relative_to(REPO)), m, a) for m, a in commands if "--help" not in a]
    return found


@pytest.mark.parametrize("doc,module,args", shown_commands(), ids=lambda v: v if isinstance(v, str) else None)
def test_documented_command_parses(doc, module, args, monkeypatch, tmp_path):
    from helpers.config import Config

    def stopping(parse_args):
        def stop(self, *a, **k):
            raise Parsed(parse_args(self, *a, **k))  # a bad command exits here, as a user would see it
        return stop

    for parser in (argparse.ArgumentParser, jsonargparse.ArgumentParser):
        monkeypatch.setattr(parser, "parse_args", stopping(parser.parse_args))
    written = tmp_path / "config.json"  # what helpers.runtime.train_command writes
    written.write_text(json.dumps(Config().to_dict()))
    main = importlib.import_module(module).main
    with pytest.raises(Parsed):
        main([str(written) if CONFIG_FILE.fullmatch(a) else a for a in args])


def test_the_docs_show_the_main_commands():
    modules = {m for _, m, _ in shown_commands()}
    assert {"helpers.train", "helpers.export", "helpers.space", "helpers.annotations"} <= modules


def test_the_readme_layout_table_names_every_helpers_module():
    listed = set(re.findall(r"^\| `helpers/(\w+)\.py` \|", (REPO / "README.md").read_text(), re.M))
    modules = {p.stem for p in (REPO / "helpers").glob("*.py")} - {"__init__"}
    assert modules - listed == set(), "README's layout table lacks these modules"
    assert listed - modules == set(), "README's layout table names modules that do not exist"
