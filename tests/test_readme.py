"""The README cannot drift from what ships. Every `sdtrain ...` command it shows, in its code
blocks and in its prose, names a command and options the CLI has (and values they take); the
examples in its code blocks run as a user would type them where that is cheap (`launch` with
`--dry-run` added, `estimate`, `recipe show`, `import-deepspeed`), the rest as `--help`; every
file, module and make target it names exists.

The check goes one way, README -> CLI: a flag the CLI gains keeps this green until the README
mentions it, and then the README's use of it is checked. The commands run in this process
through click's CliRunner, so the whole file takes seconds."""

from __future__ import annotations

import glob
import importlib.util
import re
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from sdtrain.cli import cli
from sdtrain.cli_options import DEEPSPEED_ONLY, DEEPSPEED_RUNNERS, RUNNER_NAMES
from sdtrain.errors import UserInputError

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
# A shell line that starts sdtrain: optional `$ `, VAR=value assignments, a wrapper (salloc ...).
COMMAND = re.compile(r"^(?:\$ )?(?:[A-Z_][A-Z0-9_]*=\S+\s+)*(?:\S+\s+)*?sdtrain\s")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_.]*$")  # RECIPE, F, N, CHECKPOINT, OUT.safetensors's stem
# The commands whose examples run as written (cheap, nothing started); launch gets --dry-run.
RUN_AS_WRITTEN = {("launch",), ("estimate",), ("recipe",), ("recipe", "show"), ("import-deepspeed",)}


def fenced_blocks(text: str) -> list[str]:
    return FENCE.findall(text)


def prose(text: str) -> str:
    return FENCE.sub("", text)


def block_commands(block: str) -> list[str]:
    """The sdtrain command lines of one code block: a block that shows output marks its
    commands with `$ ` (so an output line starting with "sdtrain" is no command); an indented
    line starting with `[` continues the synopsis above it; a trailing `# ...` is a comment."""
    lines = block.splitlines()
    prompted = any(line.startswith("$ ") for line in lines)
    commands: list[str] = []
    for line in lines:
        if commands and re.match(r"^\s+\[", line) and not prompted:
            commands[-1] += " " + line.strip()
        elif (line.startswith("$ ") or not prompted) and COMMAND.match(line):
            commands.append(re.sub(r"\s+#\s.*$", "", line.removeprefix("$ ")).strip())
    return commands


def prose_commands(text: str) -> list[str]:
    """Inline code in the prose that is an sdtrain command (a span may cross a line break)."""
    return [" ".join(span.split()) for span in re.findall(r"`(sdtrain [^`]+)`", prose(text))]


FENCED = [c for block in fenced_blocks(README) for c in block_commands(block)]
INLINE = prose_commands(README)


def split(command: str) -> tuple[dict, list[str]]:
    """(environment, argv after `sdtrain`) of a shell line."""
    tokens = shlex.split(command.replace("'OPTS'", "OPTS"))
    at = tokens.index("sdtrain")
    env = dict(t.split("=", 1) for t in tokens[:at] if re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", t))
    return env, tokens[at + 1:]


def resolve(argv: list[str]) -> tuple[tuple[str, ...], click.Command, list[str]]:
    """The command path argv names, that command, and the arguments after the path."""
    command, path, rest = cli, (), list(argv)
    while isinstance(command, click.Group) and rest:
        head = rest[0].lstrip("[(")
        if head in command.commands:
            command, path, rest = command.commands[head], (*path, head), rest[1:]
        elif "strategies" in command.commands:  # `sdtrain bench [RECIPE] ...` is `bench strategies`
            command = command.commands["strategies"]
        else:
            break
    head = rest[0].lstrip("[(") if rest else ""
    if isinstance(command, click.Group) and head and not head.startswith("-") and not PLACEHOLDER.match(head):
        pytest.fail(f"the README's `sdtrain {' '.join(argv)}`: sdtrain has no command {rest[0]!r} "
                    f"under `sdtrain {' '.join(path)}`")
    return path, command, rest


def option_names(command: click.Command) -> set[str]:
    names = {"-h", "--help"}
    for param in command.params:
        if isinstance(param, click.Option):
            names |= {*param.opts, *param.secondary_opts}
    return names


def options_used(rest: list[str]) -> list[tuple[str, str | None]]:
    """(option, the token after it) for every option the README writes: `[--a X | --b Y]`,
    `-H|--hostfile` and `--x=value` forms included."""
    used = []
    for i, token in enumerate(rest):
        following = rest[i + 1].strip("[]()") if i + 1 < len(rest) else None
        for part in token.strip("[]()").split("|"):
            match = re.fullmatch(r"(--?[A-Za-z][\w-]*)(?:=(.*))?", part)
            if match:
                used.append((match[1], match[2] if match[2] is not None else following))
    return used


def recipe_keys() -> set[str]:
    from sdtrain.recipe_doc import rows

    return {row["key"] for row in rows()}


def strategy_ok(name: str) -> bool:
    from sdtrain.bench.moe_strategy import parse_expert_strategy
    from sdtrain.bench.offload_strategy import parse_offload_strategy
    from sdtrain.bench.pipeline_strategy import parse_pipeline_strategy
    from sdtrain.bench.run import STAGES
    from sdtrain.bench.tp_strategy import parse_tensor_strategy

    try:
        return name in STAGES or any(parse(name) is not None for parse in (
            parse_pipeline_strategy, parse_expert_strategy, parse_tensor_strategy, parse_offload_strategy))
    except UserInputError:
        return False


def list_values_ok(option: str, value: str) -> list[str]:
    """The items of a list-valued option the CLI would refuse (templates such as pp<P>-... and
    ranges such as zero0..zero3 are the README's shorthand, not values)."""
    from sdtrain.bench.comm_spec import OPS
    from sdtrain.bench.run import PEERS

    known = {
        "--peers": lambda v: v in PEERS,
        "--strategies": strategy_ok,
        "--ops": lambda v: v == "all" or v in OPS,
        "--launcher": lambda v: v in RUNNER_NAMES or v in DEEPSPEED_RUNNERS,
    }
    if option not in known:
        return []
    items = [v for v in re.split(r"[,|]", value) if v and not re.search(r"[<>\[\]]|\.\.", v) and v != "..."]
    return [v for v in items if not known[option](v)]


def check_against_cli(command: str) -> None:
    _, argv = split(command)
    path, cmd, rest = resolve(argv)
    where = f"the README's `{command}`"
    names = option_names(cmd)
    params = {name: p for p in cmd.params for name in getattr(p, "opts", [])}
    for option, value in options_used(rest):
        assert option in names, f"{where}: `sdtrain {' '.join(path)}` has no option {option} (it has {sorted(names)})"
        param = params.get(option)
        if value is None or value.startswith("-") or not param:
            continue
        if isinstance(param.type, click.Choice):
            wrong = [v for v in value.split("|") if v not in param.type.choices and not PLACEHOLDER.match(v)]
            assert not wrong, f"{where}: {option} takes {list(param.type.choices)}, not {wrong}"
        wrong = list_values_ok(option, value)
        assert not wrong, f"{where}: {option} does not take {wrong}"
        if option == "--launcher":
            assert not set(value.split("|")) & set(DEEPSPEED_ONLY), where
        if option == "--set" and "=" in value and value.split("=")[0] not in ("dotted.key", "key", "KEY"):
            assert value.split("=")[0] in recipe_keys(), f"{where}: --set {value}: no such recipe key"


@pytest.mark.parametrize("command", FENCED + INLINE)
def test_readme_command_uses_what_the_cli_has(command):
    check_against_cli(command)


def test_readme_commands_block_names_every_command():
    """The Commands synopsis lists every command and subcommand the CLI has."""
    commands_block = fenced_blocks(README.split("## Commands", 1)[1])[0]
    listed = {resolve(split(c)[1])[0] for c in block_commands(commands_block)}

    def paths(group: click.Group, prefix=()):
        for name, command in group.commands.items():
            if name == "strategies":  # the bench group's default: `sdtrain bench [RECIPE]`
                yield prefix
            elif isinstance(command, click.Group):
                if command.invoke_without_command:  # `sdtrain recipe --schema`
                    yield (*prefix, name)
                yield from paths(command, (*prefix, name))
            else:
                yield (*prefix, name)

    missing = sorted(" ".join(p) for p in set(paths(cli)) - listed)
    assert not missing, f"the README's Commands block leaves out: {missing}"


def concrete(argv: list[str]) -> bool:
    return not any(re.search(r"[\[\]|<>]|\.\.\.", t) or PLACEHOLDER.match(t) for t in argv)


def expected_outcome(block: str, command: str) -> tuple[int, str]:
    """The exit code the README shows, and the reason it shows for a refusal: a comment
    `# exit N` on the command's line, or 2 where the output below it is `error: REASON: ...`."""
    lines = block.splitlines()
    at = next(i for i, line in enumerate(lines) if command in line)
    said = re.search(r"#\s*exit (\d+)", lines[at])
    if said:
        return int(said[1]), ""
    shown = lines[at + 1] if at + 1 < len(lines) else ""
    if shown.startswith("error: "):
        return 2, shown.removeprefix("error: ").split(":")[0]
    return 0, ""


EXAMPLES = [(block, c) for block in fenced_blocks(README) for c in block_commands(block) if concrete(split(c)[1])]


def invoke(argv: list[str], env: dict) -> tuple[int, str]:
    """Run the CLI in this process as `sdtrain` would: bad input exits 2 with its message."""
    result = CliRunner().invoke(cli, argv, env=env, standalone_mode=False)
    exc = result.exception
    if isinstance(exc, (UserInputError, click.ClickException)):
        return exc.exit_code, result.output + str(exc)
    if exc is not None and not isinstance(exc, SystemExit):
        raise exc
    return result.exit_code, result.output


@pytest.mark.parametrize("block,command", EXAMPLES, ids=[c for _, c in EXAMPLES])
def test_readme_example_runs(block, command, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    env, argv = split(command)
    path, _, _ = resolve(argv)
    if path not in RUN_AS_WRITTEN:
        argv, (expected, reason) = [*path, "--help"], (0, "")
    else:
        expected, reason = expected_outcome(block, command)
        for option, placed in (("--run-dir", tmp_path / "run"), ("--out", tmp_path / "out.yaml")):
            if option in argv:
                argv[argv.index(option) + 1] = str(placed)
        if path == ("launch",) and "--dry-run" not in argv:
            argv.append("--dry-run")
    assert path != ("launch",) or "--dry-run" in argv or "--help" in argv  # never a real run from here
    # The memory check's verdict is the README's (its own SDTRAIN_MEMORY_LIMIT), not this machine's free memory.
    code, output = invoke(argv, {"SDTRAIN_MEMORY_LIMIT": "64GiB", **env})
    assert code == expected, f"`sdtrain {' '.join(argv)}` exited {code}, the README shows {expected}:\n{output[-2000:]}"
    assert " ".join(reason.split()) in " ".join(output.split()), f"the README shows `error: {reason}`; today:\n{output}"


def test_readme_examples_are_found():
    """The parser above sees the README's examples (a change of format would silently skip them)."""
    assert len(FENCED) >= 15 and len(INLINE) >= 10 and len(EXAMPLES) >= 3, (len(FENCED), len(INLINE), len(EXAMPLES))


def test_readme_names_only_files_that_ship():
    """Paths of the tree the README names (recipes, hostfiles, tests, launcher files, modules)."""
    named = set(re.findall(r"(?<![\w/.-])((?:recipes|hostfiles|tests|launcher|sdtrain|\.ci)/[\w./*<>-]*\w/?)", README))
    missing = [p for p in sorted(named) if "<" not in p and not glob.glob(str(REPO / p))]
    assert not missing, f"the README names files that are not in the tree: {missing}"
    # A recipe named without its folder (`zero1.yaml`) is one of ours too; `recipe.yaml` is the user's.
    bare = set(re.findall(r"(?<![\w/.-])([\w.-]+\.yaml)\b", README)) - {"recipe.yaml"}
    missing = [n for n in sorted(bare) if not any((REPO / d / n).exists() for d in ("recipes", "launcher"))]
    assert not missing, f"the README names recipes that are not shipped: {missing}"
    modules = set(re.findall(r"-m (sdtrain[\w.]*\w)", README))
    missing = [m for m in sorted(modules) if importlib.util.find_spec(m) is None]
    assert not missing, f"the README runs modules that do not exist: {missing}"
    targets = set(re.findall(r"`make ([\w-]+)", README)) | set(re.findall(r"^make ([\w-]+)", README, re.M))
    makefile = (REPO / "Makefile").read_text()
    missing = [t for t in sorted(targets) if not re.search(rf"^{re.escape(t)}:", makefile, re.M)]
    assert not missing, f"the README names make targets the Makefile lacks: {missing}"


def test_readme_speaks_of_the_project_not_its_tracker():
    """The README says what exists: no plans, no paths outside the checkout, no issue-tracker talk."""
    wording = [r"\.\./shared", r"\bis next\b", r"\b(?:the|this) issue\b", r"\blent\b"]
    found = [m.group(0) for pattern in wording for m in re.finditer(pattern, README, re.I)]
    assert not found, f"the README still says: {found}"


@pytest.mark.parametrize("wrong", [
    "sdtrain launch RECIPE --no-such-flag",
    "sdtrain generate CHECKPOINT --beam-width 4",
    "sdtrain bench RECIPE --peers deepspeed-moo",
    "sdtrain bench RECIPE --strategies pp2-onef1b",
    "sdtrain estimate RECIPE --device tpu",
    "sdtrain launch RECIPE --set train.stpes=3",
    "sdtrain launch RECIPE --launcher mvapich",
])
def test_the_check_refuses_what_the_cli_lacks(wrong):
    """The check above is no rubber stamp: a README line with any of these would fail it."""
    with pytest.raises((AssertionError, pytest.fail.Exception)):
        check_against_cli(wrong)
