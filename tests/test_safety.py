"""Safety properties of the source itself, checked on its syntax tree (not by grepping text)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "src" / "miniplm").rglob("*.py"), *(ROOT / "bench").glob("*.py"),
                  *(ROOT / "scripts").glob("*.py")])


PICKLE_WRITES = ("dump", "dumps")


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if isinstance(func, ast.Attribute):  # x.f(): the owner's name, or "<expr>" for (...).f()
                owner = func.value.id if isinstance(func.value, ast.Name) else "<expr>"
            else:
                owner = ""  # a bare f(): a builtin or a module-level name
            yield node, owner, name


def keyword(node: ast.Call, name: str):
    for kw in node.keywords:
        if kw.arg == name:
            return kw.value
    return None


def test_no_pickle_no_eval_no_shell_strings_and_remote_code_only_by_flag():
    problems = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(), filename=str(path))
        where = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in ("dill", "cloudpickle", "marshal", "shelve") for n in names):
                    problems.append(f"{where}:{node.lineno}: imports a pickle-like module")
                if isinstance(node, ast.ImportFrom) and node.module == "pickle" \
                        or any(a.name == "pickle" and a.asname for a in node.names):
                    problems.append(f"{where}:{node.lineno}: imports from pickle (use pickle.dump by name)")
            # pickle may write (nanoGPT's meta.pkl), never read: nothing of it but dump and dumps
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "pickle" \
                    and node.attr not in PICKLE_WRITES:
                problems.append(f"{where}:{node.lineno}: pickle.{node.attr} (only {PICKLE_WRITES} are allowed)")
        for node, owner, name in calls(tree):
            line = f"{where}:{node.lineno}"
            if owner == "" and name in ("eval", "exec", "compile"):
                problems.append(f"{line}: calls {name}()")
            if (owner, name) in (("os", "system"), ("os", "popen")):
                problems.append(f"{line}: runs a shell string ({owner}.{name})")
            shell = keyword(node, "shell")
            if shell is not None and not (isinstance(shell, ast.Constant) and shell.value is False):
                problems.append(f"{line}: a subprocess with shell=...")
            if (owner, name) == ("torch", "load"):
                weights_only = keyword(node, "weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    problems.append(f"{line}: torch.load without weights_only=True")
            remote = keyword(node, "trust_remote_code")
            if isinstance(remote, ast.Constant) and remote.value is True:
                problems.append(f"{line}: trust_remote_code=True hard-coded (it must come from the user's flag)")
    assert not problems, "\n".join(problems)


def test_every_stage_config_keeps_remote_code_off_by_default():
    from miniplm.cli import COMMANDS

    for command in COMMANDS:
        fields = command.config_cls.__dataclass_fields__
        if "trust_remote_code" in fields:
            assert fields["trust_remote_code"].default is False, command.name
